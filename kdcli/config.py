"""Run configuration: pydantic models, config files, and ``--set`` overrides.

A config is data, never code: TOML, YAML or JSON files are parsed with safe
loaders and validated; unknown keys are rejected everywhere.  The ``method``
section holds the method's name plus its hyperparameters, which the method's
own pydantic model validates (see :mod:`kdcli.method`).
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kdcli.defaults import DEFAULT_METHODS, MAX_SEED
from kdcli.errors import UsageError, one_line

MAX_DEPTH = 32  # nesting of a config file or --set value; a real config is 3 deep
MAX_NODES = 100_000  # values in one, aliases counted each time they are used (YAML "billion laughs")
MAX_LR = 1e3  # no optimizer trains with a step larger than this; 1e308 overflows float32 parameters
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
MIN_CROP_PCT = 0.05  # evaluation resizes to image_size / crop_pct: 20x the crop at most
MIN_MIX_ALPHA, MAX_MIX_ALPHA = 1e-3, 1e3  # Beta(alpha, alpha) in float32: below, torch rounds alpha to 0 and refuses it


def _mix_alpha(value: float) -> float:
    if value != 0.0 and not MIN_MIX_ALPHA <= value <= MAX_MIX_ALPHA:
        raise PydanticCustomError("mix_alpha", "0 (off) or between {low} and {high}", {"low": MIN_MIX_ALPHA, "high": MAX_MIX_ALPHA})
    return value


MixAlpha = Annotated[NonNegativeFloat, AfterValidator(_mix_alpha)]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored, and true/false is no number."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads true as 1: ``--set train.epochs=true`` would train one epoch.
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool) and not _accepts_bool(field.annotation):
                    raise PydanticCustomError("bool_not_number", "{key}: expected a number, got {value}", {"key": name, "value": str(value).lower()})
        return data


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false itself (``bool | None``, ``Literal["auto"] | bool``), not as 0/1."""
    if annotation is bool:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(value, bool) for value in get_args(annotation))
    return any(_accepts_bool(argument) for argument in get_args(annotation))


class SyntheticConfig(StrictModel):
    """Parameters of the embedded mixed-feature data set (fixed by its own seed)."""

    num_train: PositiveInt = 10_000
    num_test: PositiveInt = 2_000
    num_classes: int = Field(10, ge=2)
    vocab_size: PositiveInt = 100
    features_per_input: PositiveInt = 4
    image_size: int = Field(16, ge=8)
    patch_size: PositiveInt = 4
    noise_std: NonNegativeFloat = 0.2
    dirichlet_alpha: PositiveFloat = 0.05
    zipf_exponent: NonNegativeFloat = 1.0
    label_flip: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of train labels moved to another class (label noise; test untouched)."
    )
    label_flip_val: bool = Field(
        True, description="Flip the validation split's labels too; false = a clean held-out set, as meta-learned weighting assumes."
    )
    seed: Seed = 0


class DataConfig(StrictModel):
    """Which data set, where it lives, the validation split, and augmentation."""

    name: str = Field("synthetic", description="synthetic, cifar10, cifar100, or imagefolder:PATH")
    root: Path = Field(Path("data"), description="Directory holding (or receiving) downloaded data sets.")
    download: bool = False
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of train held out for validation.")
    split_seed: Seed = Field(0, description="Seed of the train/val split, fixed across training seeds.")
    image_size: PositiveInt = Field(64, description="Side length images are resized to (imagefolder).")
    in_memory: Literal["auto"] | bool = Field(
        "auto",
        description="imagefolder: decode the whole set into memory once (true), stream files through worker processes "
        "(false), or stream only when the decoded set exceeds memory_budget_gb (auto).",
    )
    memory_budget_gb: PositiveFloat = Field(4.0, description="The decoded size up to which in_memory=auto keeps a set in memory.")
    workers: NonNegativeInt | None = Field(None, description="Decoding processes of the streaming path; None = min(8, CPUs).")
    on_corrupt: Literal["skip", "stop"] = Field(
        "skip", description="Streaming: a training image that does not decode is skipped and counted, or stops the run."
    )
    crop_pct: float = Field(0.875, ge=MIN_CROP_PCT, le=1.0, description="Streaming evaluation: resize to image_size / crop_pct, center crop.")
    crop_scale_min: float = Field(0.08, gt=0.0, le=1.0, description="Streaming training: RandomResizedCrop's smallest area fraction.")
    auto_augment: Literal["none", "trivial", "rand"] = Field(
        "none", description="Streaming training: TrivialAugment or RandAugment after the crop and flip."
    )
    crop_padding: NonNegativeInt | None = Field(None, description="Random-crop padding; None = the data set's recipe.")
    hflip: bool | None = Field(None, description="Random horizontal flip; None = the data set's recipe.")
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="Random rotation range in degrees (0 = off).")
    mixup_alpha: MixAlpha = Field(
        0.0, description="Mixup of training batches: the mixing weight ~ Beta(alpha, alpha) (0 = off; timm's --mixup)."
    )
    cutmix_alpha: MixAlpha = Field(
        0.0, description="CutMix of training batches: the kept area ~ Beta(alpha, alpha) (0 = off; timm's --cutmix). "
        "With mixup_alpha too, each mixed batch gets one of the two, with equal odds.",
    )
    mix_prob: float = Field(
        1.0, ge=0.0, le=1.0, description="The chance a training batch is mixed when mixup or cutmix is on (timm's --mixup-prob)."
    )
    synthetic: SyntheticConfig = SyntheticConfig()

    @property
    def mixing(self) -> bool:
        """Whether training batches are mixed (their targets become class probabilities)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class ModelConfig(StrictModel):
    """The network trained by this run (a timm or CIFAR-zoo model name)."""

    name: str | None = Field(None, min_length=1, description="timm model name; None = the job's default.")


class OptimConfig(StrictModel):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=MAX_LR)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    grad_clip: PositiveFloat | None = Field(None, description="Max gradient norm (None = no clipping).")
    no_decay_norm_bias: bool = Field(
        True, description="No weight decay on norm weights, biases and other 1-d parameters (timm's and most recipes' rule)."
    )
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Layer-wise lr decay: each student layer group below the head gets lr x layer_decay^depth "
        "(timm's grouping, e.g. 0.75 for ViT fine-tuning); None = one lr.",
    )


class ScheduleConfig(StrictModel):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[PositiveInt] = Field(default_factory=list, description="Epochs at which multistep multiplies lr by gamma.")
    gamma: PositiveFloat = 0.1
    warmup_epochs: NonNegativeFloat = Field(0.0, description="Linear warm-up length in epochs.")


class TrainConfig(StrictModel):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 512
    save_every: PositiveInt = Field(1, description="Keep checkpoints/epoch_NNNN.safetensors every K epochs.")
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on CUDA, fp32 on CPU.")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the student's forward (and, apart, the teacher's); losses run eagerly.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode with train.compile: reduce-overhead replays each step as CUDA graphs "
        "(fewer kernel launches: the small CIFAR networks are launch-bound on a GPU).",
    )
    deterministic: bool = False
    keep_best: bool = Field(False, description="Also keep best.safetensors, the epoch with the highest val top-1.")
    early_stop_patience: PositiveInt | None = Field(
        None, description="Stop after this many epochs without a better val top-1 (implies keep_best)."
    )
    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN/inf loss term: stop (naming epoch, step and term; the last checkpoint stays) "
        "or skip the step's update and count it (mixed precision).",
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Keep an EMA of the student's weights (timm's ModelEmaV3) with this decay, e.g. 0.999; evaluated "
        "each epoch (ema_val_top1) and saved as ema.safetensors.  None = no EMA.",
    )
    accumulate_steps: PositiveInt = Field(
        1, description="Micro-batches per optimizer step: train.batch_size is split into this many (gradient accumulation)."
    )
    sync_bn: bool = Field(False, description="Under torchrun on CUDA: batch-norm statistics over every process's batch (SyncBatchNorm).")
    cache_teacher: bool = Field(
        False, description="Compute the teacher's logits once and reuse them (stored next to the teacher checkpoint)."
    )
    cache_teacher_codec: Literal["fp32", "fp16", "int8"] | None = Field(
        None,
        description="How the teacher cache keeps every logit: fp32 (exact, 4 bytes a class), fp16 (2) or int8 on "
        "each sample's own scale (1); None = DEFAULT_CACHE_CODEC. docs/teacher-cache.md gives each one's error.",
    )
    cache_teacher_topk: PositiveInt | None = Field(
        None,
        description="Keep only each sample's k largest teacher logits and the tail's log-sum-exp (tables for many classes); "
        "None = every logit, kept by cache_teacher_codec.",
    )
    cache_teacher_temperature: PositiveFloat | None = Field(
        None,
        description="The temperature at which a top-k table keeps the tail's mass exact; None = the method's "
        "temperature hyperparameter (1 if it has none).",
    )
    teacher_resize: Literal["auto", "off"] = Field(
        "auto",
        description="A timm:NAME teacher: resize the student's crop to the teacher's pretrained input size with its "
        "interpolation when they differ (auto), or feed the crop as it is (off).",
    )

    @model_validator(mode="after")
    def _selection_needs_best(self) -> TrainConfig:
        if self.early_stop_patience is not None:
            self.keep_best = True
        return self


class LogConfig(StrictModel):
    """Experiment trackers (``kdcli.loggers`` plugins): each gets the config, every epoch record and the summary."""

    to: list[str] = Field(default_factory=list, description="Logger names, e.g. [tensorboard, wandb, mlflow] (kdcli.loggers entry points).")
    project: str = Field("kdcli", description="The W&B project / MLflow experiment the run is logged under.")
    name: str | None = Field(None, description="The run's name in the trackers; None = the run directory's name.")

    @field_validator("to", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("to")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class MethodConfig(BaseModel):
    """The method's name plus its hyperparameters (validated by the method itself)."""

    model_config = ConfigDict(extra="allow")

    name: str | None = Field(None, description="The method; None = the job's default (DEFAULT_METHODS).")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(StrictModel):
    job: Literal["teach", "distill"] = "teach"
    method: MethodConfig = MethodConfig()
    model: ModelConfig = ModelConfig()
    teacher: Path | None = None
    teacher_min_top1: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Warn before distilling when the teacher's clean top-1 is below this; None = halfway from chance to 1.",
    )
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="after")
    def _job_default_method(self) -> RunConfig:
        if self.method.name is None:
            self.method.name = DEFAULT_METHODS[self.job]
        return self

    @model_validator(mode="after")
    def _best_needs_validation(self) -> RunConfig:
        if self.train.keep_best and self.data.val_split == 0:
            raise ValueError("train.keep_best and train.early_stop_patience select on the validation split; set data.val_split above 0")
        return self



def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line naming each bad key, why, and the value that was given."""
    parts = []
    for item in error.errors():
        key = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        given = item.get("input")
        shown = "" if isinstance(given, dict) else f" (got {one_line(repr(given), 80)})"
        parts.append(f"{key}: {item['msg']}{shown}")
    return "; ".join(parts)


class DuplicateKey(ValueError):
    """A key given twice in one mapping of a config file: YAML and JSON would silently keep the last."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise DuplicateKey(f"duplicate key {one_line(str(key), 80)!r}")
        mapping[key] = value
    return mapping


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: its keys may be overridden, as YAML intends
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(f"duplicate key {one_line(str(key), 80)!r} (line {key_node.start_mark.line + 1})")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON config file into a plain dict."""
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 -- a SafeLoader subclass
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            raise UsageError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, DuplicateKey) as exc:
        first_line = str(exc).splitlines()[0]
        raise UsageError(f"cannot parse config file {path}: {first_line}") from None
    except RecursionError:
        raise UsageError(f"config file {path} is nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table/mapping at the top level")
    check_tree(data, f"config file {path}")
    _check_sections(data, RunConfig, f"config file {path}")
    return data


def _check_sections(data: dict[str, Any], model: type[BaseModel], source: str, prefix: str = "") -> None:
    """A section given as anything but a mapping (``train: []``, an empty ``train:``) is refused, not merged over."""
    for name, field in model.model_fields.items():
        section = field.annotation
        if name not in data or not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        value = data[name]
        if not isinstance(value, dict):
            shown = "empty" if value is None else f"a {type(value).__name__}"
            raise UsageError(f"{source}: {prefix}{name} is a section and must be a mapping of its keys, not {shown}")
        _check_sections(value, section, source, f"{prefix}{name}.")


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=VALUE``; VALUE is read as JSON when it parses, else as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"an override is KEY=VALUE, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise UsageError(f"override {key.strip()}: the value is nested deeper than {MAX_DEPTH} levels") from None
    check_tree(value, f"override {key.strip()}")
    path = key.strip().split(".")
    if len(path) > MAX_DEPTH:
        raise UsageError(f"override {one_line(key, 80)}: the key is nested deeper than {MAX_DEPTH} levels")
    return path, value


def check_tree(value: Any, source: str) -> None:
    """Refuse input nested deeper than ``MAX_DEPTH`` or holding more than ``MAX_NODES`` values.

    Iterative and stopping at the limit: a YAML file of 500 bytes can alias
    its way to billions of values, which must not be walked (or printed).
    """
    pending, count = [(value, 0)], 0
    while pending:
        node, depth = pending.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise UsageError(f"{source} is nested deeper than {MAX_DEPTH} levels")
        if count > MAX_NODES:
            raise UsageError(f"{source} holds more than {MAX_NODES} values (YAML aliases count each time they are used)")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children)


def set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(
    *,
    defaults: dict[str, Any] | None = None,
    file: Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Layer defaults < config file < explicit flags < ``--set`` and validate once."""
    # A copy: --set writes into nested sections, which must not leak into the caller's defaults.
    tree = deep_merge(copy.deepcopy(defaults or {}), read_config_file(file) if file is not None else {})
    tree = deep_merge(tree, flags or {})
    for assignment in overrides or []:
        path, value = parse_override(assignment)
        set_nested(tree, path, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise UsageError(f"invalid config: {format_validation_error(exc)}") from None


# Keys added since 0.2 whose default changed what a run does: a run saved without them keeps its old behaviour.
PRE_KEY_BEHAVIOUR = {("optim", "no_decay_norm_bias"): False}


def load_resolved_config(path: Path) -> RunConfig:
    """Read back a run's ``config.json``."""
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
        for (section, key), value in PRE_KEY_BEHAVIOUR.items():
            if isinstance(tree, dict) and isinstance(tree.get(section), dict):
                tree[section].setdefault(key, value)
        return RunConfig.model_validate(tree)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a valid kdcli config: not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise UsageError(f"{path} is not a valid kdcli config: nested too deeply") from None
    except FileNotFoundError:
        raise UsageError(f"{path.parent} is not a kdcli run directory (no config.json)") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not a valid kdcli config: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValidationError as exc:
        raise UsageError(f"{path} is not a valid kdcli config: {format_validation_error(exc)}") from None
