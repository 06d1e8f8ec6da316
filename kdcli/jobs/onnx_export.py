"""``export --format onnx``: a model as one ONNX file that carries its own preprocessing and class names.

``model.onnx`` takes ``input``, float32 images [N, C, H, W] scaled to [0, 1] and
normalized with the metadata's ``mean`` and ``std``, any batch size N, and
returns ``logits`` [N, num_classes].  Its metadata (``metadata_props``, read by
onnxruntime's ``get_modelmeta().custom_metadata_map``) holds the preprocessing as
JSON values, so a deployment needs nothing but the file: ``input_size``,
``mean``, ``std``, ``interpolation``, ``crop_pct``, ``class_names`` (the image
folder's class names when known, else the class indices as strings) and the
architecture.  Exported by torch's ONNX exporter (``dynamo=True``); it needs
the ``onnx`` extra (``onnx``, ``onnxscript``), and checking it ``onnxruntime``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdcli.errors import KdcliError, first_line

ONNX_FILE = "model.onnx"
OPSET = 18
INPUT, OUTPUT = "input", "logits"


def onnx_bytes(model: nn.Module, input_size: Sequence[int], metadata: dict[str, Any]) -> bytes:
    """``model`` (eval mode, CPU, fp32) exported with a dynamic batch dimension, ``metadata`` as JSON values."""
    require_exporter()
    example = torch.zeros(2, *input_size)
    batch = torch.export.Dim("batch")
    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR  # the exporter logs its progress at INFO/WARNING
    try:
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: batch},), verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user gets one line
        raise KdcliError(f"ONNX export of this model failed: {first_line(exc)}") from None
    finally:
        quiet.level = level
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def require_exporter() -> None:
    """One line naming the extra when torch's ONNX exporter lacks its packages."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise KdcliError(f"ONNX export needs {' and '.join(missing)}: pip install 'kdcli[onnx]'")


def onnx_metadata(pretrained_cfg: dict[str, Any], arch: str, class_names: Sequence[str] | None) -> dict[str, Any]:
    """What a deployment needs to prepare inputs and name outputs, from the export's timm ``pretrained_cfg``."""
    num_classes = int(pretrained_cfg["num_classes"])
    return {
        "architecture": arch,
        "input_size": list(pretrained_cfg["input_size"]),
        "mean": list(pretrained_cfg["mean"]),
        "std": list(pretrained_cfg["std"]),
        "interpolation": pretrained_cfg["interpolation"],
        "crop_pct": pretrained_cfg["crop_pct"],
        "class_names": list(class_names) if class_names is not None else [str(index) for index in range(num_classes)],
        "producer": "kdcli",
    }
