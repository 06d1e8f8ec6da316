"""``wandb``: a Weights & Biases run (``WANDB_MODE=offline`` keeps it in ``RUN_DIR/wandb``); the ``wandb`` extra."""

from __future__ import annotations

from typing import Any

from kdcli.loggers import LoggerRun, RunLogger, epoch_numbers


class WandbLogger(RunLogger):
    """The config as the run's config, every epoch number at step = epoch, test metrics in the run summary."""

    extra = "wandb"

    def start(self, run: LoggerRun) -> None:
        import wandb

        self.run = wandb.init(
            project=run.project, name=run.name, dir=str(run.run_dir), config=run.config,
            job_type=run.config.get("job"), reinit="create_new",
            settings=wandb.Settings(console="off"),  # leave kdcli's own output alone
        )

    def log_epoch(self, epoch: int, metrics: dict[str, float], record: dict[str, Any]) -> None:
        self.run.log(metrics | {"epoch": epoch}, step=epoch)

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update(epoch_numbers({"test": summary.get("test") or {}}) | {"best_epoch": summary.get("best_epoch")})
        self.run.finish(exit_code=0 if summary is not None else 1)
