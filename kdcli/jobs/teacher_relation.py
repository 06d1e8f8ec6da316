"""How a distillation run's teacher relates to its student, named in the run summary.

Yuan et al. (CVPR 2020) show that KD also helps when the teacher has the
student's own architecture (self-distillation), is smaller and weaker than the
student (reversed KD: the roles swapped) or is poorly trained (defective KD).  None of these needs a
method of its own: ``distill`` takes any checkpoint that predicts the data
set's classes.  This module only names the situation, from facts every run
has: architectures, parameter counts, the teacher checkpoint's epoch within
its own run, and both networks' test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from kdcli.checkpoint import CheckpointInfo


# A top-1 gap counts only beyond this many standard errors of the difference (about 95 % one-sided at 2).
NOISE_STANDARD_ERRORS = 2.0


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@dataclass(frozen=True)
class TeacherRelation:
    teacher_arch: str
    student_arch: str
    teacher_params: int
    student_params: int
    teacher_epoch: int
    teacher_run_epochs: int | None  # planned epochs of the run that wrote the checkpoint, when recorded
    teacher_top1: float
    student_top1: float
    test_samples: int  # the size of the test split both accuracies come from

    @classmethod
    def of(
        cls, teacher: nn.Module, info: CheckpointInfo, student: nn.Module, student_arch: str,
        teacher_top1: float, student_top1: float, test_samples: int,
    ) -> TeacherRelation:
        planned = info.config.get("train", {}).get("epochs")
        return cls(
            teacher_arch=info.arch,
            student_arch=student_arch,
            teacher_params=parameter_count(teacher),
            student_params=parameter_count(student),
            teacher_epoch=info.epoch,
            teacher_run_epochs=planned if isinstance(planned, int) else None,
            teacher_top1=teacher_top1,
            student_top1=student_top1,
            test_samples=test_samples,
        )

    @property
    def same_architecture(self) -> bool:
        return self.teacher_arch == self.student_arch

    @property
    def smaller_teacher(self) -> bool:
        return self.teacher_params < self.student_params

    @property
    def accuracy_noise(self) -> float:
        """NOISE_STANDARD_ERRORS standard errors of the student-minus-teacher top-1 on ``test_samples`` samples.

        The two accuracies are treated as independent; both models are scored on
        the same images, which correlates them, so this overstates the noise
        (a label needs a clear gap)."""
        variance = sum(top1 * (1 - top1) for top1 in (self.teacher_top1, self.student_top1)) / max(self.test_samples, 1)
        return NOISE_STANDARD_ERRORS * math.sqrt(variance)

    @property
    def less_accurate_teacher(self) -> bool:
        """Less accurate beyond sampling noise: a gap of a few test samples is no evidence of a poorly trained teacher."""
        return self.student_top1 - self.teacher_top1 > self.accuracy_noise

    @property
    def early_checkpoint(self) -> bool:
        return self.teacher_run_epochs is not None and self.teacher_epoch < self.teacher_run_epochs

    @property
    def kind(self) -> str:
        """The paper's name for the situation; the first that applies wins.

        Reversed KD is the roles swapped: a smaller, weaker network teaching a
        larger one.  A teacher at least as large that is still less accurate
        than its student is poorly trained: the defective-teacher case, early
        checkpoint or not.
        """
        if self.early_checkpoint and self.less_accurate_teacher:
            return "defective KD"
        if self.same_architecture:
            return "self-distillation"
        if self.less_accurate_teacher:
            return "reversed KD" if self.smaller_teacher else "defective KD"
        return "standard KD"

    def facts(self) -> list[str]:
        """One short clause per notable fact, for the human-readable summary."""
        facts = ["same architecture" if self.same_architecture else f"{self.teacher_arch} teaches {self.student_arch}"]
        if self.smaller_teacher:
            facts.append(f"teacher has fewer parameters ({_millions(self.teacher_params)} vs {_millions(self.student_params)})")
        accuracies = f"test top-1 {self.teacher_top1:.4f} vs {self.student_top1:.4f}"
        noise = f"sampling noise ±{self.accuracy_noise:.4f} on {self.test_samples} test samples"
        if self.less_accurate_teacher:
            facts.append(f"teacher less accurate than the student ({accuracies}; the gap exceeds its {noise})")
        elif self.teacher_top1 < self.student_top1:
            facts.append(f"teacher and student equally accurate within {noise} ({accuracies})")
        if self.early_checkpoint:
            facts.append(f"teacher is an early checkpoint (epoch {self.teacher_epoch} of {self.teacher_run_epochs})")
        return facts

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "kind": self.kind,
            "same_architecture": self.same_architecture,
            "smaller_teacher": self.smaller_teacher,
            "less_accurate_teacher": self.less_accurate_teacher,
            "accuracy_noise": self.accuracy_noise,
            "early_checkpoint": self.early_checkpoint,
            "facts": self.facts(),
        }


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"
