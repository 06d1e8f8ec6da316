"""Where and how this process trains: device, precision, process group and collectives."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdcli.config import TrainConfig
from kdcli.errors import KdcliError, UsageError


@dataclass(frozen=True)
class Runtime:
    """Device, autocast precision, rank and world size of this process."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def per_rank_batch_size(self, global_batch_size: int) -> int:
        """The batch size is global: each of the world's processes takes an equal share."""
        if global_batch_size % self.world_size:
            raise UsageError(
                f"batch size {global_batch_size} is the global batch and must divide evenly over {self.world_size} processes"
            )
        return global_batch_size // self.world_size

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process; every process must ask at the same point."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor(float(flag), device=self.device)).item())

    def max_over_ranks(self, value: int) -> int:
        """The largest of every process's ``value``; every process must ask at the same point."""
        if not self.distributed:
            return value
        return int(self.all_reduce_max(torch.tensor(value, dtype=torch.int64, device=self.device)).item())

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` (tensors moved to the CPU), in rank order, on rank 0; None elsewhere.

        Objects travel between this run's own processes (pickled by torch.distributed), never through files.
        """
        value = tree_to_cpu(value)
        if not self.distributed:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate equally shaped tensors from every rank along dim 0."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def shutdown(self, *, wait_for_others: bool = True) -> None:
        """Leave the process group (torchrun warns about processes that do not).

        After a failure the others may never reach a barrier: leave without one.
        """
        if self.distributed and dist.is_initialized():
            if wait_for_others:
                dist.barrier()
            dist.destroy_process_group()

    def rng_states(self) -> dict[str, Tensor]:
        """The global generators a training step draws from (CPU, and this process's GPU)."""
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def set_rng_states(self, states: dict[str, Tensor]) -> None:
        torch.set_rng_state(states["torch"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self.device)

    def wrap(self, module: nn.Module, train: TrainConfig) -> nn.Module:
        """Move the trainable module (the student and its connectors) to the device, then wrap it once for DDP and ``torch.compile``."""
        module = self.place(module, train)
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        if train.compile:
            module = compiled(module, mode=train.compile_mode)
        return module

    def place(self, module: nn.Module, train: TrainConfig) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if train.channels_last else module


def compiled(function: Any, *, mode: str = "default") -> Any:
    """``torch.compile`` in ``mode`` (``train.compile_mode``) with static shapes: an epoch's smaller last batch gets a graph of its own.

    Left to automatic dynamic shapes it would recompile shape-generic, and that graph,
    tried first from then on, would run every later full batch with slower kernels.
    """
    return torch.compile(function, dynamic=False, mode=None if mode == "default" else mode)


def keeping_saved_tensors(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` for a step that backpropagates through it twice (``retain_graph=True``).

    A compiled backward frees ("donates") the tensors its forward saved; a second backward
    through the same graph needs them, so graphs compiled by this call keep them.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._functorch.config.patch(donated_buffer=False):  # read when the graph compiles, on the first call
            return forward(*args, **kwargs)

    return call


def compile_errors() -> type[BaseException]:
    """What torch.compile raises when it cannot trace or generate code; imported only when asked (dynamo is slow to import)."""
    from torch._dynamo.exc import TorchDynamoException

    return TorchDynamoException


def tree_to_cpu(tree: Any) -> Any:
    """Nested dicts and lists with every tensor on the CPU."""
    if isinstance(tree, Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: tree_to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [tree_to_cpu(value) for value in tree]
    return tree


def setup_runtime(train: TrainConfig) -> Runtime:
    """Pick the device, join the process group under torchrun, set precision and determinism."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise KdcliError("train.device is cuda but no CUDA device is available")
    if want_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, autocast_dtype=_autocast_dtype(train.precision, device), rank=rank, world_size=world_size)


@contextmanager
def runtime_for(train: TrainConfig) -> Iterator[Runtime]:
    """A runtime that leaves the process group it joined, however the work inside ends.

    A process group that was already joined (an outer runtime) stays joined; the
    process-wide numerics settings (determinism, TF32, cuDNN autotuning) are put back.
    """
    joins = not (dist.is_available() and dist.is_initialized())
    numerics = _numerics_settings()
    try:
        runtime = setup_runtime(train)
        try:
            yield runtime
        except BaseException:
            if joins:
                runtime.shutdown(wait_for_others=False)
            raise
        if joins:
            runtime.shutdown()
    finally:
        _restore_numerics(numerics)  # determinism and TF32 are process-wide: a later run in this process starts clean


def _numerics_settings() -> tuple[bool, bool, bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
    )


def _restore_numerics(settings: tuple[bool, bool, bool, bool]) -> None:
    deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = settings
    torch.use_deterministic_algorithms(deterministic)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise KdcliError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16
