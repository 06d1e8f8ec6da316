"""``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR``); the ``tensorboard`` extra."""

from __future__ import annotations

import json
from typing import Any

from kdcli.loggers import LoggerRun, RunLogger, epoch_numbers


class TensorBoardLogger(RunLogger):
    """Every epoch number as a scalar (step = epoch), the config and summary as text."""

    extra = "tensorboard"

    def start(self, run: LoggerRun) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))
        self.last_epoch = 0
        self.writer.add_text("config", _markdown_json(run.config), global_step=0)

    def log_epoch(self, epoch: int, metrics: dict[str, float], record: dict[str, Any]) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=epoch)
        self.last_epoch = epoch
        self.writer.flush()

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            for name, value in epoch_numbers({"test": summary.get("test") or {}}).items():
                self.writer.add_scalar(name, value, global_step=self.last_epoch)
            self.writer.add_text("summary", _markdown_json(summary), global_step=self.last_epoch)
        self.writer.close()


def _markdown_json(value: Any) -> str:
    """JSON as a code block: TensorBoard's text plugin renders markdown."""
    return "```\n" + json.dumps(value, indent=2) + "\n```"
