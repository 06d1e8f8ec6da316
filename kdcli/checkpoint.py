"""The only module that reads or writes weights and training state.

Two kinds of safetensors file, never pickle:

* a *model checkpoint*: the model's own ``state_dict`` under its own key names
  (loads into plain timm/PyTorch with ``safetensors.torch.load_file``), plus
  string metadata describing how to rebuild the model and the data it expects;
* a *state file* (resume state): any nested structure of dicts, lists, scalars
  and tensors, flattened into tensors plus a JSON skeleton in the metadata.

Every write goes to a temporary file in the same directory, is fsynced, then
renamed over the target, so a crash leaves either the old or the new file.
Every file carries a SHA-256 digest of its tensors (names, dtypes, shapes,
bytes) and metadata; loading checks the format, its version and the digest
before anything is built from the contents.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from kdcli.errors import KdcliError, first_line
# Re-exported: the write helpers lived here before kdcli.files held the rule for every file.
from kdcli.files import TEMPORARY_PATTERN, TEMPORARY_SUFFIX, WriteFailed, atomic_write_bytes, check_target, file_sha256  # noqa: F401

CHECKPOINT_FORMAT = "kdcli-checkpoint"
STATE_FORMAT = "kdcli-state"
FORMAT_VERSION = 2  # 2: every file carries a digest
DIGEST_KEY = "sha256"
_NOT_A_CHECKPOINT = "a safetensors file but not a kdcli checkpoint (no kdcli metadata)"
_NOT_A_STATE = "not a kdcli resume-state file"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself: enough to rebuild model and data."""

    arch: str
    num_classes: int
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    epoch: int
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    # Where the weights come from: {"teacher": {arch, sha256, epoch, method, top1, split, lineage}} for a student.
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def in_chans(self) -> int:
        return self.input_size[0]

    def to_metadata(self) -> dict[str, str]:
        values = asdict(self)
        metadata = {key: _encode(value) for key, value in values.items()}
        metadata.update(format=CHECKPOINT_FORMAT, format_version=str(FORMAT_VERSION), in_chans=str(self.in_chans))
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: Path) -> CheckpointInfo:
        _check_format(metadata, CHECKPOINT_FORMAT, source, _NOT_A_CHECKPOINT)
        try:
            values = {key: metadata[key] if key in _TEXT_FIELDS else json.loads(metadata[key]) for key in _INFO_FIELDS if key in metadata}
            fields = _InfoFields.model_validate(values)
        except (ValueError, RecursionError) as exc:  # pydantic's ValidationError is a ValueError
            raise KdcliError(f"{source} has damaged kdcli metadata ({_describe(exc)})") from None
        return cls(**fields.model_dump())


class _InfoFields(BaseModel):
    """What checkpoint metadata must hold before a model is built from it."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(min_length=1)
    num_classes: PositiveInt
    input_size: tuple[PositiveInt, PositiveInt, PositiveInt]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str
    epoch: NonNegativeInt
    data: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    config: dict[str, Any] = {}
    lineage: dict[str, Any] = {}

    @model_validator(mode="after")
    def _normalization_fits_channels(self) -> _InfoFields:
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values, one per input channel")
        if not all(math.isfinite(value) for value in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError("mean must be finite and std finite and positive")
        return self


# A pretrained config's input size: past these, the teacher's resize costs more than the whole run (and 60000 px
# sides allocate terabytes); a real model's config is between 32 and about 1000 px, close to square.
MAX_PRETRAINED_SIDE = 4096
MAX_PRETRAINED_ASPECT = 8


class _PretrainedFields(_InfoFields):
    """A timm teacher's ``pretrained_cfg``: checked like user input, it comes from a file kdcli did not write."""

    @model_validator(mode="after")
    def _input_size_is_plausible(self) -> _PretrainedFields:
        height, width = self.input_size[1:]
        if max(height, width) > MAX_PRETRAINED_SIDE or max(height, width) > MAX_PRETRAINED_ASPECT * min(height, width):
            raise ValueError(
                f"input_size {height}x{width}: sides must be at most {MAX_PRETRAINED_SIDE} px and "
                f"within {MAX_PRETRAINED_ASPECT}:1 of each other"
            )
        return self


def pretrained_info(config: dict[str, Any], *, name: str, num_classes: int) -> CheckpointInfo:
    """A timm model's ``pretrained_cfg`` as checkpoint info, validated; one error line naming the bad value."""
    values = {
        "arch": str(config.get("architecture") or name), "num_classes": num_classes,
        "input_size": config.get("input_size", (3, 224, 224)), "mean": config.get("mean", (0.485, 0.456, 0.406)),
        "std": config.get("std", (0.229, 0.224, 0.225)), "method": "pretrained", "epoch": 0,
    }
    try:
        return CheckpointInfo(**_PretrainedFields.model_validate(values).model_dump())
    except ValueError as exc:
        raise KdcliError(f"the pretrained config of timm teacher {name} is invalid ({_describe(exc)})") from None


_INFO_FIELDS = tuple(_InfoFields.model_fields)
_TEXT_FIELDS = ("arch", "method")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{where}: {error['msg']}" if where else error["msg"]
    return first_line(exc)


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _owned_cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    return {key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format) for key, value in tensors.items()}


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over metadata and every tensor's name, dtype, shape and bytes, independent of file layout."""
    digest = hashlib.sha256(json.dumps(sorted((k, v) for k, v in metadata.items() if k != DIGEST_KEY)).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, reads: tuple[Path, ...] = ()) -> None:
    """Atomically write a safetensors file whose metadata carries the digest of its contents."""
    owned = _owned_cpu_tensors(tensors)
    signed = {**metadata, DIGEST_KEY: _digest(owned, metadata)}
    atomic_write_bytes(path, save_bytes(owned, metadata=signed), reads=reads)


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], info: CheckpointInfo, *, reads: tuple[Path, ...] = ()) -> None:
    save_tensors(path, state_dict, info.to_metadata(), reads=reads)


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise KdcliError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise KdcliError(f"not a file: {path}")
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    """The header's metadata alone (no digest check): for reading what a file says about itself."""
    try:
        with safe_open(str(_existing_file(path)), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise KdcliError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def load_tensors(path: Path, expected_format: str, not_that_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kdcli file, after checking its format, version and digest.

    ``not_that_format`` completes "PATH is ..." when the file is not of ``expected_format``.
    """
    try:
        raw = _existing_file(path).read_bytes()
        tensors = load_bytes(raw)
        header_size = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, RecursionError) as exc:
        raise KdcliError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None
    _check_format(metadata, expected_format, path, not_that_format)
    if metadata.get(DIGEST_KEY) != _digest(tensors, metadata):
        raise KdcliError(f"{path} is damaged: its contents do not match the SHA-256 digest it was written with")
    return tensors, metadata


def _check_format(metadata: dict[str, str], expected_format: str, path: Path, not_that_format: str) -> None:
    if metadata.get("format") != expected_format:
        raise KdcliError(f"{path} is {not_that_format}")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise KdcliError(f"{path} has format version {version!r}; this kdcli reads version {FORMAT_VERSION} only")


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    """What a checkpoint says about itself, from its header alone (no digest check)."""
    return CheckpointInfo.from_metadata(_read_metadata(path), path)


def checkpoint_digest(path: Path) -> str:
    """The SHA-256 digest a kdcli file was written with (its contents' identity), from the header alone."""
    return _read_metadata(path).get(DIGEST_KEY, "")


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    tensors, metadata = load_tensors(path, CHECKPOINT_FORMAT, _NOT_A_CHECKPOINT)
    return tensors, CheckpointInfo.from_metadata(metadata, path)


def tensors_mismatch(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """How ``tensors`` differ from ``expected`` in names, dtypes or shapes; None when they match."""
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"{label} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        return "; ".join(parts)
    for name, want in expected.items():
        got = tensors[name]
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{name} is {_kind(got)}, expected {_kind(want)}"
    return None


def _kind(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


# -- state files: nested structures without pickle ------------------------------------

_TENSOR = "$tensor"
_MAPPING = "$dict"


def flatten_state(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into named tensors and a JSON-able skeleton.

    Mappings keep their key types (optimizer state is keyed by int), so they
    are stored as ``{"$dict": [[key, value], ...]}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {_TENSOR: path}
        if isinstance(node, dict):
            return {_MAPPING: [[key, walk(value, f"{path}/{key}")] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{path}/{index}") for index, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path or '/'} in a state file")

    skeleton = walk(tree, "")
    return tensors, skeleton


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if isinstance(skeleton, dict) and _MAPPING in skeleton:
        return {key: unflatten_state(tensors, value) for key, value in skeleton[_MAPPING]}
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, value) for value in skeleton]
    return skeleton


def save_state(path: Path, tree: dict[str, Any], *, label: str = "an unlabelled state") -> None:
    """Atomically write ``tree``; ``label`` says in words which point of training it holds."""
    tensors, skeleton = flatten_state(tree)
    metadata = {"format": STATE_FORMAT, "format_version": str(FORMAT_VERSION), "label": label, "skeleton": json.dumps(skeleton)}
    save_tensors(path, tensors, metadata)


def load_state(path: Path) -> dict[str, Any]:
    tensors, metadata = load_tensors(path, STATE_FORMAT, _NOT_A_STATE)
    try:
        return unflatten_state(tensors, json.loads(metadata["skeleton"]))
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise KdcliError(f"{path} has a damaged state skeleton ({first_line(exc)})") from None


def read_state_label(path: Path) -> str:
    """Which point of training a state file holds, from its header alone ("epoch 3", "step 5/9 of epoch 4")."""
    metadata = _read_metadata(path)
    _check_format(metadata, STATE_FORMAT, path, _NOT_A_STATE)
    return metadata.get("label", "an unlabelled state")


def structure_mismatch(tree: Any, template: Any, where: str = "") -> str | None:
    """Where ``tree`` differs from ``template`` in kind: mapping keys, list lengths, value types, tensor dtypes and shapes.

    Values may differ; ``None`` when the structure matches.  Used to check a
    loaded state against what the running code would have saved.
    """
    if isinstance(template, torch.Tensor):
        if not isinstance(tree, torch.Tensor):
            return f"{where or '/'} should be a tensor"
        return None if (tree.dtype, tree.shape) == (template.dtype, template.shape) else f"{where} is {_kind(tree)}, expected {_kind(template)}"
    if isinstance(template, dict):
        if not isinstance(tree, dict):
            return f"{where or '/'} should be a mapping"
        if tree.keys() != template.keys():
            return f"{where or '/'} has keys {sorted(map(str, tree))[:6]}, expected {sorted(map(str, template))[:6]}"
        return next((found for key in template if (found := structure_mismatch(tree[key], template[key], f"{where}/{key}"))), None)
    if isinstance(template, (list, tuple)):
        if not isinstance(tree, (list, tuple)) or len(tree) != len(template):
            return f"{where or '/'} should be a list of {len(template)}"
        return next((found for index, (item, want) in enumerate(zip(tree, template)) if (found := structure_mismatch(item, want, f"{where}/{index}"))), None)
    return None if _same_scalar_kind(tree, template) else f"{where or '/'} is {tree!r}, expected a {type(template).__name__}"


def _same_scalar_kind(value: Any, template: Any) -> bool:
    if isinstance(template, bool) or template is None or isinstance(template, str):
        return type(value) is type(template)
    if isinstance(template, int):
        return type(value) is int
    return type(value) in (int, float)  # a whole number where a float is expected is still a number
