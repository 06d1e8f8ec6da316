"""``standard``: plain cross-entropy, for teachers and baseline students."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from kdcli.method import Batch, Method, MethodParams, StepOutput


class StandardParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy.")


class Standard(Method):
    """Cross-entropy only (empirical risk minimization)."""

    roles = frozenset({"teach", "distill"})
    teacher_use = "none"
    summary = "Cross-entropy training: teachers and baseline students."
    Params = StandardParams
    accepts_soft_targets = True  # F.cross_entropy, label smoothing included, takes class probabilities

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.student_logits(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.params.label_smoothing)
        return StepOutput(logits, {"ce": loss})
