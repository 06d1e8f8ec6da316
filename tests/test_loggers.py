"""Experiment trackers: each built-in logger runs for real and offline, and its output is read back.

TensorBoard: event files read with tensorboard's own reader.  MLflow: a local
``file:`` store read back through its client.  W&B: offline mode, the records of
the run directory's ``.wandb`` file decoded with wandb's protobuf schema.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import TINY, run_cli
from kdcli import registry


def distill_logged(teacher_run: Path, out: Path, loggers: str) -> tuple[list[dict], dict]:
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 2, "--out", out, "--log", loggers, *TINY)
    assert result.exit_code == 0, result
    assert "warning: logger" not in result.stderr, result.stderr
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return history, json.loads((out / "summary.json").read_text())


def test_tensorboard_event_files(teacher_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history, summary = distill_logged(teacher_run, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss/kd", "loss/total", "val_top1", "train_top1", "lr", "test/top1"} <= set(scalars)
    kd = events.Scalars("loss/kd")
    assert [event.step for event in kd] == [1, 2]
    assert [event.value for event in kd] == pytest.approx([record["loss"]["kd"] for record in history])
    assert events.Scalars("test/top1")[-1].value == pytest.approx(summary["test"]["top1"])
    assert {"config/text_summary", "summary/text_summary"} <= set(events.Tags()["tensors"])


def test_mlflow_file_store(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    history, summary = distill_logged(teacher_run, tmp_path / "run", "mlflow")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kdcli")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["method.name"] == "kd" and run.data.params["train.epochs"] == "2"
    val = sorted((metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "val_top1"))
    assert [step for step, _ in val] == [record["epoch"] for record in history]
    assert [value for _, value in val] == pytest.approx([record["val_top1"] for record in history])
    assert run.data.metrics["test/top1"] == pytest.approx(summary["test"]["top1"])


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a ``.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, block = path.read_bytes(), 7, b"", 32768
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if room < 7 or (length == 0 and kind == 0):
            position += room
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    history, summary = distill_logged(teacher_run, tmp_path / "run", "wandb")
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log))
    runs = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert runs[0].project == "kdcli" and runs[0].display_name == "run"
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["method"]["name"] == "kd" and config["train"]["epochs"] == 2
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in records if record.WhichOneof("record_type") == "history"]
    assert [row["val_top1"] for row in rows] == pytest.approx([record["val_top1"] for record in history])
    assert [row["loss/kd"] for row in rows] == pytest.approx([record["loss"]["kd"] for record in history])
    final = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for record in records if record.WhichOneof("record_type") == "summary" for item in record.summary.update}
    assert final["test/top1"] == pytest.approx(summary["test"]["top1"])


def test_unknown_logger_is_refused_before_disk(teacher_run: Path, tmp_path: Path) -> None:
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--out", tmp_path / "run", "--log", "tensorbord")
    assert result.exit_code == 2 and result.stderr.startswith("kdcli: error: unknown logger 'tensorbord'; did you mean tensorboard?")
    assert not (tmp_path / "run").exists()


BROKEN = '''
from kdcli.loggers import RunLogger


class Missing(RunLogger):
    extra = "missing"

    def start(self, run):
        import kdcli_no_such_tracker  # noqa: F401


class Crashing(RunLogger):
    def log_epoch(self, epoch, metrics, record):
        raise ConnectionError("server down\\nsecond line")
'''


def test_failing_loggers_warn_once_and_training_goes_on(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    dist_info = site / "broken_loggers-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-loggers\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[kdcli.loggers]\nmissing = broken_loggers:Missing\ncrashing = broken_loggers:Crashing\nunimportable = no_such_module:Thing\n")
    (site / "broken_loggers.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(site))
    registry.clear_caches()
    try:
        out = tmp_path / "run"
        result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--epochs", 2, "--out", out, "--log", "missing,crashing,unimportable", *TINY)
    finally:
        registry.clear_caches()
    assert result.exit_code == 0, result
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: logger")]
    assert len(warnings) == 3, result.stderr
    assert any("'missing' failed in start" in line and "pip install 'kdcli[missing]'" in line for line in warnings)
    assert any("'crashing' failed in log_epoch" in line and "ConnectionError: server down" in line for line in warnings)
    assert any("'unimportable'" in line and "failed to load" in line for line in warnings)
    assert (out / "summary.json").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 2
