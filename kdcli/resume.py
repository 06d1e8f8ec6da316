"""A run's resume state: built after every epoch (or at a stop inside one), checked, applied.

The state is a tree of tensors and plain values saved with
``kdcli.checkpoint.save_state`` (safetensors, no pickle).  Before a loaded
state touches the run it is compared with the state this run would save: a
state from another config, or a damaged one, is refused with the first
difference found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdcli.checkpoint import flatten_state, structure_mismatch, tensors_mismatch
from kdcli.errors import first_line
from kdcli.runtime import Runtime
from kdcli.tally import EpochTally

STATE_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "method", "history", "best", "position")  # and "ema" with --ema
NO_BEST = {"epoch": 0, "val_top1": -1.0}


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Restored:
    """Where a loaded state puts the run: the epochs done, and inside which step of the next one."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    start_epoch: int
    position: dict[str, Any] | None  # {"epoch", "tally", "rng"} of a stop inside ``start_epoch``
    method_state: dict[str, Any]


@dataclass
class ResumeState:
    """The parts of a run a resume state holds, and the run's length it must fit."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Stateful
    scaler: Stateful
    method: Stateful
    runtime: Runtime
    epochs: int
    steps_per_epoch: int  # micro-batches
    ema: Stateful | None = None  # the student's EMA (train.ema_decay)

    def build(self, epoch: int, history: list[dict[str, Any]], best: dict[str, Any], position: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` (or, with ``position``, inside the next one)."""
        state = {
            "epoch": epoch,
            "model": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "history": history,
            "best": best,
            "position": position,
        }
        return state if self.ema is None else {**state, "ema": self.ema.state_dict()}

    def position(self, epoch: int, tally: EpochTally) -> dict[str, Any] | None:
        """Where inside ``epoch`` the run is: this process's tally and generators; under torchrun every
        process's (and its method state), gathered on rank 0 (None on the others)."""
        local = {"tally": tally.state(), "rng": self.runtime.rng_states()}
        if not self.runtime.distributed:
            return {"epoch": epoch, **local}
        ranks = self.runtime.gather_to_main({**local, "method": self.method.state_dict()})
        return None if ranks is None else {"epoch": epoch, "ranks": ranks}

    def apply(self, state: Any) -> tuple[Restored | None, str | None]:
        """Load ``state`` once it has the structure this run saves; else (None, the first difference)."""
        problem = self.problem(state)
        if problem is not None:
            return None, problem
        try:
            return self._load(state), None
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            return None, first_line(exc)

    def _load(self, state: dict[str, Any]) -> Restored:
        self.student.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        position = state["position"]
        for entry in [] if position is None else position.get("ranks", [position]):
            torch.Generator().set_state(entry["rng"]["torch"])  # fail here, not mid-epoch, on a state torch refuses
        return Restored(list(state["history"]), dict(state["best"]), state["epoch"] + 1, position, state["method"])

    def problem(self, state: Any) -> str | None:
        """The first way ``state`` differs from what this run would save, or None."""
        template = self.build(0, [], dict(NO_BEST))
        if not isinstance(state, dict) or state.keys() != template.keys():
            return "not the top-level keys of a resume state"
        checks = (
            lambda: structure_mismatch(state["model"], template["model"], "model"),
            lambda: self._optimizer_problem(state["optimizer"], template["optimizer"]),
            lambda: structure_mismatch(state["scheduler"], template["scheduler"], "scheduler"),
            lambda: structure_mismatch(state["scaler"], template["scaler"], "scaler"),
            lambda: structure_mismatch(state.get("ema"), template.get("ema"), "ema"),
            lambda: _shared_tensors_mismatch(state["method"], template["method"], "method"),
            lambda: self._progress_problem(state),
        )
        return next((found for check in checks if (found := check())), None)

    def _optimizer_problem(self, loaded: Any, template: dict[str, Any]) -> str | None:
        # Per-parameter state appears lazily with the first step, so it is checked against the parameters themselves.
        if not isinstance(loaded, dict) or loaded.keys() != template.keys():
            return "optimizer should hold state and param_groups"
        if found := structure_mismatch(loaded["param_groups"], template["param_groups"], "optimizer/param_groups"):
            return found
        if [group["params"] for group in loaded["param_groups"]] != [group["params"] for group in template["param_groups"]]:
            return "optimizer/param_groups name other parameters"
        if not isinstance(loaded["state"], dict):
            return "optimizer/state should be a mapping"
        parameters = [parameter for group in self.optimizer.param_groups for parameter in group["params"]]
        for index, values in loaded["state"].items():
            if type(index) is not int or not 0 <= index < len(parameters) or not isinstance(values, dict):
                return f"optimizer/state/{index} belongs to no parameter"
            if found := _parameter_state_problem(index, values, parameters[index]):
                return found
        return None

    def _progress_problem(self, state: dict[str, Any]) -> str | None:
        epoch, history, position, epochs = state["epoch"], state["history"], state["position"], self.epochs
        if type(epoch) is not int or not 0 <= epoch <= epochs:
            return f"epoch {epoch!r} is outside 0..{epochs}"
        if not isinstance(history, list) or len(history) != epoch:
            return f"history should hold one record for each of {epoch} epochs"
        for number, record in enumerate(history, start=1):
            if not isinstance(record, dict) or record.get("epoch") != number or type(record.get("skipped_steps")) is not int:
                return f"history record {number} is damaged"
        if found := structure_mismatch(state["best"], {"epoch": 0, "val_top1": 0.0}, "best"):
            return found
        return None if position is None else self._position_problem(position, epoch)

    def _position_problem(self, position: Any, epoch: int) -> str | None:
        if not isinstance(position, dict) or position.get("epoch") != epoch + 1:
            return f"position is not inside epoch {epoch + 1}"
        ranks = position.get("ranks")
        if ranks is None:
            return self._entry_problem({key: value for key, value in position.items() if key != "epoch"}, "position", with_method=False)
        if not isinstance(ranks, list) or len(ranks) != self.runtime.world_size:
            return f"position/ranks should hold one entry for each of {self.runtime.world_size} processes"
        return next((found for rank, entry in enumerate(ranks) if (found := self._entry_problem(entry, f"position/ranks/{rank}", with_method=True))), None)

    def _entry_problem(self, entry: Any, where: str, *, with_method: bool) -> str | None:
        """One process's place in the epoch: its tally, generators and (under torchrun) method state."""
        tally = entry.get("tally") if isinstance(entry, dict) else None
        sums = tally.get("sums") if isinstance(tally, dict) else None
        if not isinstance(sums, dict):
            return f"{where}/tally/sums should be a mapping"
        zeros = EpochTally(lr=0.0, correct=torch.zeros(()), sums={name: torch.zeros(()) for name in sums})
        template = {"tally": zeros.state(), "rng": self.runtime.rng_states()}
        if with_method:
            template["method"] = self.method.state_dict()
            if found := _shared_tensors_mismatch(entry.get("method"), template["method"], f"{where}/method"):
                return found
            entry = {**entry, "method": template["method"]}  # method state may grow: compared above, tensor by tensor
        if found := structure_mismatch(entry, template, where):
            return found
        if not 0 <= entry["tally"]["step"] < self.steps_per_epoch:
            return f"{where} is not inside the epoch"
        return None


def _parameter_state_problem(index: int, values: dict[str, Any], parameter: Tensor) -> str | None:
    """torch's SGD and AdamW keep a scalar step count and buffers shaped like the parameter."""
    for name, value in values.items():
        if name == "step":
            fits = type(value) in (int, float) or (isinstance(value, Tensor) and value.is_floating_point() and value.numel() == 1)
        else:
            fits = value is None or (isinstance(value, Tensor) and (value.shape, value.dtype) == (parameter.shape, parameter.dtype))
        if not fits:
            kind = str(parameter.dtype).removeprefix("torch.")
            return f"optimizer/state/{index}/{name} does not fit a {kind} parameter of shape {list(parameter.shape)}"
    return None


def _shared_tensors_mismatch(loaded: Any, template: Any, where: str) -> str | None:
    """Tensors at the same place in both trees must agree in dtype and shape (method state may grow)."""
    loaded_tensors, template_tensors = flatten_state(loaded)[0], flatten_state(template)[0]
    shared = loaded_tensors.keys() & template_tensors.keys()
    found = tensors_mismatch({key: loaded_tensors[key] for key in shared}, {key: template_tensors[key] for key in shared})
    return None if found is None else f"{where}{found}"
