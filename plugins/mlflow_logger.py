"""``mlflow``: an MLflow run (the tracking URI from ``MLFLOW_TRACKING_URI``, e.g. ``file:./mlruns``); the ``mlflow`` extra."""

from __future__ import annotations

import time
from typing import Any

from kdcli.loggers import LoggerRun, RunLogger, epoch_numbers

MAX_PARAM_LENGTH = 500  # MLflow's limit on a parameter's value


class MlflowLogger(RunLogger):
    """Flattened config as parameters (and config.json), epoch numbers at step = epoch, summary metrics and summary.json."""

    extra = "mlflow"

    def start(self, run: LoggerRun) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(run.project)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        self.last_epoch = 0
        for key, value in _params(run.config).items():
            self.client.log_param(self.run_id, key, value)
        self.client.log_dict(self.run_id, run.config, "config.json")

    def log_epoch(self, epoch: int, metrics: dict[str, float], record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, epoch) for key, value in metrics.items()])
        self.last_epoch = epoch

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            for key, value in epoch_numbers({"test": summary.get("test") or {}}).items():
                self.client.log_metric(self.run_id, key, value, step=self.last_epoch)
            self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "KILLED")


def _params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config's leaves as ``section.key`` parameters (lists and None as text, cut to MLflow's limit)."""
    leaves: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            leaves.update(_params(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = str(value)[:MAX_PARAM_LENGTH]
    return leaves
