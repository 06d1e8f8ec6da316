"""The only module that reads or writes weights and training state.

Two kinds of safetensors file, never pickle:

* a *model checkpoint*: the model's own ``state_dict`` under its own key names
  (loads into plain timm/PyTorch with ``safetensors.torch.load_file``), plus
  string metadata describing how to rebuild the model and the data it expects;
* a *state file* (resume state): any nested structure of dicts, lists, scalars
  and tensors, flattened into tensors plus a JSON skeleton in the metadata.

Every write goes to a temporary file in the same directory, is fsynced, then
renamed over the target, so a crash leaves either the old or the new file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from kdcli.errors import KdcliError

CHECKPOINT_FORMAT = "kdcli-checkpoint"
STATE_FORMAT = "kdcli-state"
FORMAT_VERSION = 1


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
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise KdcliError(f"{source} is a safetensors file but not a kdcli checkpoint (no kdcli metadata)")
        try:
            return cls(
                arch=metadata["arch"],
                num_classes=int(metadata["num_classes"]),
                input_size=tuple(json.loads(metadata["input_size"])),
                mean=tuple(json.loads(metadata["mean"])),
                std=tuple(json.loads(metadata["std"])),
                method=metadata["method"],
                epoch=int(metadata["epoch"]),
                data=json.loads(metadata.get("data", "{}")),
                metrics=json.loads(metadata.get("metrics", "{}")),
                config=json.loads(metadata.get("config", "{}")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise KdcliError(f"{source} has damaged kdcli metadata ({type(exc).__name__}: {exc})") from None


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _owned_cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    return {key: value.detach().to("cpu").clone(memory_format=torch.contiguous_format) for key, value in tensors.items()}


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], info: CheckpointInfo) -> None:
    payload = save_bytes(_owned_cpu_tensors(state_dict), metadata=info.to_metadata())
    atomic_write_bytes(path, payload)


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise KdcliError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise KdcliError(f"not a file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise KdcliError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_bytes(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise KdcliError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint_info(path: Path) -> CheckpointInfo:
    return CheckpointInfo.from_metadata(_read_metadata(path), path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    info = read_checkpoint_info(path)
    return _load_tensors(path), info


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


def save_state(path: Path, tree: dict[str, Any]) -> None:
    tensors, skeleton = flatten_state(tree)
    metadata = {"format": STATE_FORMAT, "format_version": str(FORMAT_VERSION), "skeleton": json.dumps(skeleton)}
    atomic_write_bytes(path, save_bytes(_owned_cpu_tensors(tensors), metadata=metadata))


def load_state(path: Path) -> dict[str, Any]:
    metadata = _read_metadata(path)
    if metadata.get("format") != STATE_FORMAT:
        raise KdcliError(f"{path} is not a kdcli resume-state file")
    tensors = _load_tensors(path)
    try:
        return unflatten_state(tensors, json.loads(metadata["skeleton"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise KdcliError(f"{path} has a damaged state skeleton ({_first_line(exc)})") from None
