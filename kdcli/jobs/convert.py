"""``convert``: import a model trained elsewhere (a PyTorch ``.pth``) as a kdcli checkpoint.

The file is read with ``torch.load(weights_only=True)`` and nothing else: tensors,
dicts, lists and numbers load; a file that needs arbitrary code to unpickle (a
whole pickled model, an ``argparse.Namespace``, a custom class) is refused with
an explanation.  Parameter names are mapped (wrapper prefixes such as
DataParallel's ``module.`` are stripped, ``--rename`` prefixes applied), every
tensor's name and shape is checked against the architecture, and the result is
an ordinary kdcli checkpoint that ``distill --teacher`` and ``eval`` accept.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from kdcli.checkpoint import CheckpointInfo, check_target, read_checkpoint_info, save_checkpoint
from kdcli.config import DataConfig
from kdcli.errors import KdcliError, UsageError
from kdcli.files import file_sha256
from kdcli.jobs.common import load_data, new_model, require_model

# Prefixes that wrappers add to every parameter name: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training scripts commonly keep the weights inside a checkpoint dict, in order of preference.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net", "student")
# The data set a zoo's pretrained config describes, so that a converted model evaluates without --data.
ZOO_DATA = {"cifar_": ("cifar100", 100)}
METHOD = "imported"
DEFAULT_NUM_CLASSES = 1000  # timm's, for architectures whose config names none
SHOWN_NAMES = 4


@dataclass(frozen=True)
class InputSpec:
    """What the user said the model expects; None = infer (from the weights, ``--data`` or the arch)."""

    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelInputs:
    """The input shape and normalization recorded in the checkpoint."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ConvertSummary:
    source: Path
    output: Path
    arch: str
    key: str
    renamed: dict[str, str]
    num_tensors: int
    info: CheckpointInfo

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "arch": self.arch,
            "key": self.key,
            "renamed": self.renamed,
            "num_tensors": self.num_tensors,
            "num_classes": self.info.num_classes,
            "input_size": list(self.info.input_size),
            "mean": list(self.info.mean),
            "std": list(self.info.std),
            "data": self.info.data.get("name"),
            "epoch": self.info.epoch,
        }


def convert_checkpoint(
    source: Path,
    output: Path,
    *,
    arch: str,
    key: str | None = None,
    renames: list[str] | None = None,
    data: str | None = None,
    data_root: Path | None = None,
    download: bool = False,
    spec: InputSpec = InputSpec(),
    overwrite: bool = False,
) -> ConvertSummary:
    """Read ``source`` safely, fit it to ``arch`` and write ``output`` as a kdcli checkpoint."""
    _check_output(output, source, overwrite=overwrite)
    prefix_map = parse_renames(renames or [])
    loaded = load_weights_only(source)
    weights, found_at = find_state_dict(loaded, key, source)
    weights, renamed = map_names(weights, prefix_map)

    require_model(arch)
    num_classes = infer_num_classes(arch, weights, spec.num_classes, source)
    data_config, inputs = resolve_inputs(arch, num_classes, data, data_root, download, spec, source)

    model = new_model(arch, num_classes=num_classes, input_size=inputs.input_size)
    check_fit(model, weights, arch, source)
    model.load_state_dict(weights)
    check_forward(model, arch, inputs.input_size, num_classes)

    info = CheckpointInfo(
        arch=arch,
        num_classes=num_classes,
        input_size=inputs.input_size,
        mean=inputs.mean,
        std=inputs.std,
        method=METHOD,
        epoch=_epoch_of(loaded),
        data=data_config,
        config={"converted_from": {"file": source.name, "sha256": file_sha256(source), "key": found_at, "renamed": renamed}},
    )
    save_checkpoint(output, model.state_dict(), info, reads=(source,))
    return ConvertSummary(source, output, arch, found_at, renamed, len(weights), info)


def _check_output(output: Path, source: Path, *, overwrite: bool) -> None:
    """A new .safetensors file, or with ``overwrite`` a kdcli checkpoint (its metadata says so), never the source."""
    if output.suffix != ".safetensors":
        raise UsageError(f"the output must be a .safetensors file (got {output})")
    check_target(output, reads=(source,))
    if not output.exists():
        return
    if not overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    try:
        read_checkpoint_info(output)
    except KdcliError:
        raise UsageError(f"refusing to overwrite {output}: it is not a kdcli checkpoint, and kdcli replaces only files it wrote") from None


# -- reading ---------------------------------------------------------------------------


def load_weights_only(source: Path) -> Any:
    """``torch.load(weights_only=True)``; anything that needs full unpickling is refused."""
    if not source.is_file():
        raise KdcliError(f"not a file: {source}" if source.exists() else f"file not found: {source}")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked is None:
            raise KdcliError(f"{source} is not a readable PyTorch file ({_unsupported_detail(exc)})") from None
        raise KdcliError(_needs_unpickling(source, blocked.group(1))) from None
    except Exception as exc:  # a damaged or foreign file can fail anywhere inside torch.load
        raise KdcliError(f"{source} is not a readable PyTorch file ({type(exc).__name__}: {_first_line(exc)})") from None


def _needs_unpickling(source: Path, name: str) -> str:
    if name.startswith("torch.nn.") or ".models." in name:
        what = f"a whole pickled model object ({name})"
    else:
        what = f"a pickled Python object ({name})"
    return (
        f"{source} holds {what} that only full unpickling can rebuild, and full unpickling can run "
        f"arbitrary code, so kdcli refuses it; where the file is trusted, re-save just the weights: "
        f"torch.save({{'model': model.state_dict()}}, 'weights.pth')"
    )


def _unsupported_detail(exc: BaseException) -> str:
    detail = re.search(r"Unsupported operand \d+", str(exc))
    return detail.group(0) if detail else "not a pickle"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "unreadable"


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(name, str) and isinstance(tensor, Tensor) for name, tensor in value.items())
    )


def find_state_dict(loaded: Any, key: str | None, source: Path) -> tuple[dict[str, Tensor], str]:
    """The weights inside ``loaded``: itself, the entry ``key`` (dotted), or a conventional entry."""
    if key is not None:
        value: Any = loaded
        for part in key.split("."):
            if not (isinstance(value, Mapping) and part in value):
                raise UsageError(f"{source} has no entry {key!r}{_keys_hint(loaded)}")
            value = value[part]
        if not _is_state_dict(value):
            raise UsageError(f"entry {key!r} of {source} is not a mapping of names to tensors")
        return dict(value), key
    if _is_state_dict(loaded):
        return dict(loaded), ""
    if isinstance(loaded, Mapping):
        for candidate in STATE_DICT_KEYS:
            if _is_state_dict(loaded.get(candidate)):
                return dict(loaded[candidate]), candidate
    raise UsageError(f"found no state_dict in {source}{_keys_hint(loaded)}; name its entry with --key")


def _keys_hint(loaded: Any) -> str:
    if not isinstance(loaded, Mapping):
        return f" (it holds a {type(loaded).__name__})"
    return f" (top-level entries: {', '.join(map(str, list(loaded)[:10]))})"


def _epoch_of(loaded: Any) -> int:
    epoch = loaded.get("epoch") if isinstance(loaded, Mapping) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else 0


# -- names -------------------------------------------------------------------------------


def parse_renames(renames: list[str]) -> dict[str, str]:
    """``OLD=NEW`` prefix pairs (NEW may be empty, to drop a prefix)."""
    pairs = {}
    for rename in renames:
        old, sep, new = rename.partition("=")
        if not sep or not old:
            raise UsageError(f"--rename takes OLD_PREFIX=NEW_PREFIX (got {rename!r})")
        pairs[old] = new
    return pairs


def map_names(weights: dict[str, Tensor], prefix_map: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Apply ``--rename`` prefixes, then strip wrapper prefixes that every name carries."""
    renamed: dict[str, str] = {}
    for old, new in prefix_map.items():
        if not any(name.startswith(old) for name in weights):
            raise UsageError(f"--rename {old}={new}: no parameter name starts with {old!r}")
        weights = {(new + name[len(old):] if name.startswith(old) else name): value for name, value in weights.items()}
        renamed[old] = new
    stripping = True
    while stripping:
        stripping = False
        for prefix in WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in weights):
                weights = {name[len(prefix):]: value for name, value in weights.items()}
                renamed[prefix] = renamed.get(prefix, "")
                stripping = True
    return weights, renamed


# -- what the model expects ---------------------------------------------------------------


def infer_num_classes(arch: str, weights: dict[str, Tensor], given: int | None, source: Path) -> int:
    """The row count of the classifier weight (named by the arch's timm pretrained config).

    Without it, ``--num-classes`` or else the arch's default count is used: every
    shape is verified afterwards, so a wrong guess cannot produce a checkpoint.
    """
    classifier = _classifier_name(arch)
    weight = weights.get(f"{classifier}.weight") if classifier else None
    if weight is None or weight.dim() < 2:
        cfg = timm.models.get_pretrained_cfg(arch)
        return given or getattr(cfg, "num_classes", None) or DEFAULT_NUM_CLASSES
    inferred = weight.shape[0]
    if given is not None and given != inferred:
        raise UsageError(f"--num-classes {given} but the classifier {classifier}.weight in {source} has {inferred} rows")
    return inferred


def _classifier_name(arch: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(classifier, (tuple, list)):  # distilled models name two heads; the first is the classifier
        classifier = classifier[0] if classifier else None
    return classifier


def resolve_inputs(
    arch: str,
    num_classes: int,
    data: str | None,
    data_root: Path | None,
    download: bool,
    spec: InputSpec,
    source: Path,
) -> tuple[dict[str, Any], ModelInputs]:
    """The data config to record, and the input shape and normalization.

    Explicit values win over ``--data`` (the data set is loaded, as a training
    run would), which wins over the arch's timm defaults.
    """
    if data is not None:
        options: dict[str, Any] = {"name": data, "download": download}
        if data_root is not None:
            options["root"] = data_root
        data_config = DataConfig(**options)
        bundle = load_data(data_config)
        if bundle.num_classes != num_classes:
            raise UsageError(f"{source} predicts {num_classes} classes but data set {data} has {bundle.num_classes}")
        defaults = ModelInputs(tuple(bundle.input_size), tuple(bundle.mean), tuple(bundle.std))
        recorded = data_config.model_dump(mode="json")
    else:
        defaults = _arch_defaults(arch)
        recorded = _zoo_data(arch, num_classes)
    inputs = ModelInputs(spec.input_size or defaults.input_size, spec.mean or defaults.mean, spec.std or defaults.std)
    _check_normalization(inputs)
    return recorded, inputs


def _arch_defaults(arch: str) -> ModelInputs:
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise UsageError(f"{arch} has no default input size or normalization; pass --data or --input-size, --mean and --std")
    return ModelInputs(tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std))


def _zoo_data(arch: str, num_classes: int) -> dict[str, Any]:
    for prefix, (name, classes) in ZOO_DATA.items():
        if arch.startswith(prefix) and num_classes == classes:
            return DataConfig(name=name).model_dump(mode="json")
    return {}  # unknown: `kdcli eval` then needs --data


def _check_normalization(inputs: ModelInputs) -> None:
    channels = inputs.input_size[0]
    if len(inputs.mean) != channels or len(inputs.std) != channels:
        raise UsageError(
            f"--mean and --std need one value per input channel ({channels}); got {len(inputs.mean)} and {len(inputs.std)}"
        )
    if any(value <= 0 for value in inputs.std):
        raise UsageError(f"--std values must be positive (got {list(inputs.std)})")


# -- verification ------------------------------------------------------------------------


def check_fit(model: nn.Module, weights: dict[str, Tensor], arch: str, source: Path) -> None:
    """Every name present on both sides and every shape equal, or one line saying what differs."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    mismatched = [
        f"{name} {list(weights[name].shape)} vs {list(tensor.shape)}"
        for name, tensor in expected.items()
        if name in weights and weights[name].shape != tensor.shape
    ]
    problems = [
        f"{label} {len(names)} ({', '.join(names[:SHOWN_NAMES])}{', ...' if len(names) > SHOWN_NAMES else ''})"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", mismatched))
        if names
    ]
    if problems:
        hint = "; rename prefixes with --rename OLD=NEW" if missing and unexpected else ""
        raise KdcliError(f"{source} does not fit {arch}: {'; '.join(problems)}{hint}")


def check_forward(model: nn.Module, arch: str, input_size: tuple[int, int, int], num_classes: int) -> None:
    """A forward pass at the recorded input size must give one logit per class."""
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, *input_size))
    except RuntimeError as exc:
        raise UsageError(f"{arch} cannot run on inputs of shape {list(input_size)}: {_first_line(exc)}") from None
    if tuple(logits.shape) != (2, num_classes):
        raise KdcliError(f"{arch} returns outputs of shape {list(logits.shape)[1:]}, not [{num_classes}] logits")
