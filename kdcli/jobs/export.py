"""``export``: a checkpoint as the folder timm loads from the Hugging Face Hub, or as one ONNX file.

``OUT_DIR/model.safetensors`` (the bare state dict), ``config.json``
(architecture, num_classes, model_args and pretrained_cfg with the input size,
normalization and crop) and ``README.md``, a model card with the metrics, the
method and its hyperparameters, the teacher and the data set.  A timm
architecture loads with ``timm.create_model("local-dir:OUT_DIR", pretrained=True)``
or, once pushed, ``"hf-hub:REPO_ID"``; a kdcli zoo architecture (``cifar_*``)
needs ``import kdcli.models`` first, which registers it with timm.  With
``--format onnx`` the folder holds ``model.onnx`` instead (kdcli/jobs/onnx_export.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save as save_bytes
from torch import nn

from kdcli.checkpoint import CheckpointInfo, atomic_write_bytes, check_target, checkpoint_digest, file_sha256
from kdcli.errors import KdcliError, UsageError, first_line
from kdcli.jobs.classify import class_names
from kdcli.jobs.common import model_from_checkpoint
from kdcli.jobs.onnx_export import ONNX_FILE, onnx_bytes, onnx_metadata, require_exporter
from kdcli.jobs.evaluate import teacher_chain
from kdcli.results import NOT_METRICS, flatten, read_json

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
LAYOUTS = {"timm": (WEIGHTS, CONFIG, CARD), "onnx": (ONNX_FILE,)}  # the files each export format writes
MANIFEST = ".kdcli-export.json"  # the files an export wrote, with their digests: --overwrite replaces only those
EXPORT_FORMAT = "kdcli-export"


@dataclass
class ExportSummary:
    checkpoint: Path
    out: Path
    arch: str
    timm_native: bool  # False: a model plugin's architecture, which timm knows only once the plugin is imported
    format: str = "timm"
    pushed_to: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return LAYOUTS[self.format]

    def as_dict(self) -> dict[str, Any]:
        files = [str(self.out / name) for name in self.files]
        return {"checkpoint": str(self.checkpoint), "out_dir": str(self.out), "arch": self.arch, "format": self.format,
                "files": files, "timm_native": self.timm_native, "pushed_to": self.pushed_to}


def _check_out(out: Path, checkpoint: Path, files: tuple[str, ...], *, overwrite: bool) -> None:
    """Everything about OUT, before any work: no link, no input among the targets, only files a manifest records."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    for name in (*files, MANIFEST):
        check_target(out / name, reads=(checkpoint, checkpoint.parent / "summary.json"))
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{out} already exists and is not empty; choose another folder or overwrite it")
    recorded = _recorded(out)
    for name in files:
        target = out / name
        if target.exists() and file_sha256(target) not in recorded.get(name, ()):
            raise UsageError(f"refusing to overwrite {target}: kdcli did not write it, or it changed since (not as recorded in {out / MANIFEST})")


def _recorded(out: Path) -> dict[str, list[str]]:
    """The digests the export manifest records per file name; a folder without one was not made by ``export``."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"refusing to overwrite {out}: kdcli did not export into it (no {MANIFEST}); kdcli replaces only files it wrote")
    saved = read_json(manifest, "an export manifest")
    files = saved.get("files") if isinstance(saved, dict) and saved.get("format") == EXPORT_FORMAT else None
    if not isinstance(files, dict) or not all(isinstance(digests, list) for digests in files.values()):
        raise UsageError(f"refusing to overwrite {out}: {manifest} is not a kdcli export manifest")
    return files


def _write_export(out: Path, payloads: dict[str, bytes], reads: tuple[Path, ...]) -> None:
    """Each file atomically; the manifest first records old and new digests, so a cut-short export stays replaceable."""
    new = {name: [hashlib.sha256(payload).hexdigest()] for name, payload in payloads.items()}
    previous = {name: [file_sha256(out / name)] for name in payloads if (out / name).is_file()}
    # Files of the other format that an earlier export wrote here stay recorded, so they stay replaceable.
    kept = {name: digests for name, digests in _recorded(out).items() if name not in payloads} if (out / MANIFEST).is_file() else {}
    _write_manifest(out, {**kept, **{name: new[name] + previous.get(name, []) for name in payloads}})
    for name, payload in payloads.items():
        atomic_write_bytes(out / name, payload, reads=reads)
    _write_manifest(out, {**kept, **new})


def _write_manifest(out: Path, files: dict[str, list[str]]) -> None:
    record = {"format": EXPORT_FORMAT, "files": files}
    atomic_write_bytes(out / MANIFEST, (json.dumps(record, indent=2) + "\n").encode())


def export_checkpoint(
    checkpoint: Path, out: Path, *, format: str = "timm", overwrite: bool = False, push_to: str | None = None
) -> ExportSummary:
    """Write ``checkpoint`` into ``out`` in ``format`` (and upload it to ``push_to``); checks come first."""
    if format not in LAYOUTS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(LAYOUTS)}")
    _check_out(out, checkpoint, LAYOUTS[format], overwrite=overwrite)
    if format == "onnx":
        require_exporter()
    hub = hub_api() if push_to is not None else None
    model, info = model_from_checkpoint(checkpoint)
    model.eval()
    native = type(model).__module__.startswith("timm.")
    payloads = onnx_payloads(model, info) if format == "onnx" else timm_payloads(model, info, checkpoint, native=native)
    _write_export(out, payloads, reads=(checkpoint,))
    result = ExportSummary(checkpoint, out, info.arch, native, format)
    if hub is not None and push_to is not None:
        result.pushed_to = push(hub, push_to, out)
    return result


def timm_payloads(model: nn.Module, info: CheckpointInfo, checkpoint: Path, *, native: bool) -> dict[str, bytes]:
    """The Hub layout: bare weights, timm's config.json and the model card."""
    weights = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    return {
        WEIGHTS: save_bytes(weights, metadata={"format": "pt"}),
        CONFIG: (json.dumps(hub_config(model, info), indent=2) + "\n").encode(),
        CARD: model_card(info, checkpoint, deployed_summary(checkpoint), native=native).encode(),
    }


def onnx_payloads(model: nn.Module, info: CheckpointInfo) -> dict[str, bytes]:
    """``model.onnx`` with the preprocessing of timm's config and the class names in its metadata."""
    metadata = onnx_metadata(hub_config(model, info)["pretrained_cfg"], info.arch, class_names(info))
    return {ONNX_FILE: onnx_bytes(model.float().cpu(), info.input_size, metadata)}


def deployed_summary(checkpoint: Path) -> dict[str, Any] | None:
    """The run's summary (test metrics) when ``checkpoint`` is the model it reports on: best with selection, else last."""
    path = checkpoint.parent / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path, "a run summary")
    if not isinstance(summary, dict):
        raise KdcliError(f"{path} is not a kdcli run summary (not a JSON object)")
    deployed = "best.safetensors" if summary.get("best_epoch") is not None else "last.safetensors"
    return summary if checkpoint.name == deployed else None


def hub_config(model: nn.Module, info: CheckpointInfo) -> dict[str, Any]:
    """timm's ``config.json``: how to rebuild the model and how its inputs were prepared."""
    default = timm.models.get_pretrained_cfg(info.arch)
    known = default.to_dict() if default is not None else {}
    fixed = bool(known.get("fixed_input_size", False))
    model_args: dict[str, Any] = {"num_classes": info.num_classes, "in_chans": info.in_chans}
    if fixed:
        model_args["img_size"] = list(info.input_size[1:])
    pretrained_cfg = {
        "input_size": list(info.input_size),
        "fixed_input_size": fixed,
        "interpolation": "bilinear",
        "crop_pct": 1.0,  # kdcli trains and evaluates on whole images
        "crop_mode": "center",
        "mean": list(info.mean),
        "std": list(info.std),
        "num_classes": info.num_classes,
        **{key: known[key] for key in ("first_conv", "classifier") if known.get(key) is not None},
    }
    return {
        "architecture": info.arch,
        "num_classes": info.num_classes,
        "num_features": int(getattr(model, "num_features", 0)) or None,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def model_card(info: CheckpointInfo, checkpoint: Path, run_summary: dict[str, Any] | None, *, native: bool) -> str:
    """README.md: front matter the Hub reads, then what the model is, how it was trained and how well it does."""
    config = info.config
    data = info.data.get("name", "unknown")
    method = dict(config.get("method") or {"name": info.method})
    name = method.pop("name", info.method)
    lines = [
        "---",
        "library_name: timm",
        "tags: [image-classification, timm, knowledge-distillation, kdcli]",
        f"datasets: [{data}]",
        "---",
        f"# {info.arch} trained with kdcli ({name})",
        "",
        f"A `{info.arch}` for {info.num_classes} classes on `{data}` inputs of shape {tuple(info.input_size)}, "
        f"trained by `kdcli {config.get('job', 'teach')}` with the method `{name}` (epoch {info.epoch} of {(config.get('train') or {}).get('epochs', '?')}).",
        "",
        *_usage(info, native),
        *_metrics_section(info, run_summary),
        "## Method and hyperparameters",
        "",
        *(f"- `{key}`: `{json.dumps(value)}`" for key, value in method.items()),
        *(["- (defaults)"] if not method else []),
        *_training_lines(config),
        *_teacher_section(info),
        "## Data set",
        "",
        f"`{data}`; normalization mean {list(info.mean)}, std {list(info.std)}.",
        "",
        f"Exported from `{checkpoint.name}` (kdcli sha256 `{checkpoint_digest(checkpoint)}`).",
        "",
    ]
    return "\n".join(lines)


def _usage(info: CheckpointInfo, native: bool) -> list[str]:
    prelude = [] if native else ["import kdcli.models  # registers the kdcli architecture with timm"]
    return [
        "## Use",
        "",
        "```python",
        "import timm",
        *prelude,
        'model = timm.create_model("hf-hub:REPO_ID", pretrained=True)  # or "local-dir:PATH"',
        "```",
        "",
    ]


def _metrics_section(info: CheckpointInfo, run_summary: dict[str, Any] | None) -> list[str]:
    test = (run_summary or {}).get("test")
    rows = [(f"test {key}", value) for key, value in flatten(test if isinstance(test, dict) else {}).items()]
    rows += [(f"epoch {info.epoch} {key}", value) for key, value in info.metrics.items() if key not in NOT_METRICS]
    if not rows:
        return []
    return ["## Metrics", "", "| metric | value |", "| --- | --- |", *(f"| {name} | {value:.4f} |" for name, value in rows), ""]


def _training_lines(config: dict[str, Any]) -> list[str]:
    train, optim = config.get("train") or {}, config.get("optim") or {}
    facts = {key: train.get(key) for key in ("epochs", "batch_size", "seed")} | {f"optim.{key}": optim.get(key) for key in ("name", "lr", "weight_decay")}
    return ["", "Training: " + ", ".join(f"{key} {value}" for key, value in facts.items() if value is not None) + ".", ""]


def _teacher_section(info: CheckpointInfo) -> list[str]:
    chain = teacher_chain(info.lineage)
    if not chain:
        return []
    lines = ["## Teacher", ""]
    for depth, teacher in enumerate(chain):
        accuracy = teacher.get("clean_top1")
        measured = f", clean {teacher.get('clean_split', 'val')} top-1 {accuracy:.4f}" if accuracy is not None else ""
        lead = "Teacher" if depth == 0 else "its teacher"
        lines.append(f"- {lead}: `{teacher.get('arch')}` ({teacher.get('method')}, epoch {teacher.get('epoch')}{measured}), "
                     f"file `{Path(str(teacher.get('file', ''))).name}`, kdcli sha256 `{teacher.get('sha256')}`")
    return [*lines, ""]


def hub_api() -> Any:
    """A logged-in ``HfApi``, or one line saying what is missing."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise KdcliError("pushing to the Hugging Face Hub needs huggingface_hub: pip install 'kdcli[hub]'") from None
    if get_token() is None:
        raise KdcliError("pushing to the Hugging Face Hub needs a login: run `hf auth login` or set HF_TOKEN")
    return HfApi()


def push(api: Any, repo_id: str, folder: Path) -> str:
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), commit_message="Add model exported by kdcli", ignore_patterns=[MANIFEST])
    except Exception as exc:  # network, permissions: the export itself is complete on disk
        raise KdcliError(f"{folder} is written, but the upload to {repo_id} failed: {type(exc).__name__}: {first_line(exc)}") from None
    return str(url.repo_id)
