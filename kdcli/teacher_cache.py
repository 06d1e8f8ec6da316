"""Teacher-output caching (``train.cache_teacher``): the frozen teacher's logits, computed once.

``CachedTeacher`` is a teacher source (see :mod:`kdcli.teacher`): a method
asks it for a batch's logits, and a training batch (one that names the epoch
whose replayable augmentation made it) is answered from a table keyed by
``batch.index``; only samples not stored yet run the real teacher.  Every
other batch (a method's own pass over a split, a perturbed copy it built)
runs the real teacher, so a method gets the teacher's true outputs either way.

What is stored:

* without random augmentation, one [N, C] table for the whole run: filled in
  epoch 1 and reused by every later epoch and later run;
* with random augmentation, one table per epoch: augmentation is replayable
  (sample i's view is a function of seed, epoch and i), so a later run with the
  same teacher, data, augmentation and seed reuses the tables of the epochs it
  shares (``sweep-checkpoints`` distilling many students from one teacher).

Tables live next to the teacher checkpoint as safetensors state files,
``teacher-cache/TEACHER.KEY[.epochNNNN].safetensors`` in the teacher's folder
(a sub-folder, so globs for checkpoints such as ``checkpoints/epoch_*.safetensors``
never pick up a table); KEY hashes the teacher file's bytes, the training
split's pixels and labels, normalization, augmentation, seed, precision, the
codec that keeps a row (fp32, fp16, int8 or top-k at a temperature) and the
table format, so any change of those starts a new table.

Only logits are cached: a method that asks for the teacher's features gets a
``TeacherCacheError`` saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import torch
from torch import Tensor, nn

from kdcli.checkpoint import load_state, save_state
from kdcli.data.loading import Augment, Split
from kdcli.errors import KdcliError, UsageError
from kdcli.step import Batch
from kdcli.teacher import FrozenTeacher, Renormalization

# Bump when the meaning or layout of a stored table changes (how augmentation is drawn or seeded; 2: columns;
# 3: top-k keeps the tail's log-sum-exp at the run's temperature, codecs name themselves in the key).
CACHE_FORMAT = 3
HASH_CHUNK_BYTES = 1 << 24
CACHE_FOLDER = "teacher-cache"


class TeacherCacheError(KdcliError):
    """A method asked the cached teacher for more than its logits."""


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(
    teacher_path: Path, train: Split, augment: Augment, *, seed: int, precision: str, codec: LogitCodec | None = None
) -> str:
    """What the stored table is a function of (the logits and how a row keeps them), hashed to 16 hex digits."""
    facts = {
        "codec": (codec or FullLogits()).facts(),
        "format": CACHE_FORMAT,
        "teacher": file_digest(teacher_path),
        "train": train.digest(),
        "mean": augment.mean,
        "std": augment.std,
        "augment": augment.facts(),
        "seed": seed if augment.is_random else None,
        "precision": precision,
    }
    return hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=8).hexdigest()


def cache_path(teacher_path: Path, key: str, epoch: int | None) -> Path:
    """``teacher-cache/TEACHER.KEY.safetensors`` beside the teacher, with ``.epochNNNN`` for per-epoch tables."""
    suffix = "" if epoch is None else f".epoch{epoch:04d}"
    return teacher_path.parent / CACHE_FOLDER / f"{teacher_path.stem}.{key}{suffix}.safetensors"


def check_writable(teacher_path: Path) -> None:
    folder = teacher_path.parent / CACHE_FOLDER
    if not os.access(folder if folder.exists() else teacher_path.parent, os.W_OK):
        raise UsageError(f"the teacher cache (train.cache_teacher) stores the teacher's logits in {folder}, which is not writable")


class LogitCodec(Protocol):
    """How a batch of teacher logits becomes per-sample table columns, and back.

    ``facts`` names the codec and its settings: part of the cache key, so a
    table is only read back by the codec that wrote it.
    """

    def facts(self) -> dict[str, object]: ...

    def encode(self, logits: Tensor) -> dict[str, Tensor]: ...

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor: ...


@dataclass(frozen=True)
class FullLogits:
    """The exact logits: one row of C fp32 numbers per sample (4C bytes)."""

    def facts(self) -> dict[str, object]:
        return {"codec": "fp32"}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        return {"logits": logits}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        return columns["logits"]


@dataclass(frozen=True)
class HalfLogits:
    """Every logit in fp16, less the row's maximum (kept in fp32): 2C+4 bytes a sample.

    Subtracting the maximum puts the classes that carry the probability mass
    next to 0, where fp16 is finest (a logit 10 below the top is off by at most
    2^-8); the maximum restores the logits themselves, not only their softmax.
    """

    def facts(self) -> dict[str, object]:
        return {"codec": "fp16"}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        top = logits.float().amax(dim=1, keepdim=True)
        return {"centered": (logits.float() - top).to(torch.float16), "max": top.squeeze(1)}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        return columns["centered"].float() + columns["max"].unsqueeze(1)


INT8_LEVELS = 255


@dataclass(frozen=True)
class Int8Logits:
    """Every logit as one byte on the row's own scale: C+8 bytes a sample.

    Sample i's logits are ``offset_i + scale_i * q`` with q in 0..255, offset
    the row's minimum and scale its range / 255, so each logit is off by at
    most half a step (range / 510) and the row's maximum is kept to rounding.
    """

    def facts(self) -> dict[str, object]:
        return {"codec": "int8"}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        logits = logits.float()
        low, high = logits.amin(dim=1, keepdim=True), logits.amax(dim=1, keepdim=True)
        scale = ((high - low) / INT8_LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
        levels = ((logits - low) / scale).round().clamp(0, INT8_LEVELS)
        return {"levels": levels.to(torch.uint8), "offset": low.squeeze(1), "scale": scale.squeeze(1)}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        return columns["offset"].unsqueeze(1) + columns["scale"].unsqueeze(1) * columns["levels"].float()


@dataclass(frozen=True)
class TopKLogits:
    """The k largest logits, their classes and the tail's log-sum-exp at temperature tau: 8k+4 bytes a sample.

    The tail (the C-k other classes) is stored as ``tau * logsumexp(tail / tau)``
    in fp32, not as 1 - sum(top-k probabilities), which cancels to nothing for a
    confident teacher.  Decoding gives every tail class the same logit, chosen
    so that at temperature tau the softmax of the decoded row has the exact
    top-k probabilities and the exact tail mass (to fp32 rounding, whatever the
    margin); only the shape of the tail is lost (spread evenly).  At another
    temperature the top-k logits are still exact but the tail mass is not, so
    tau is part of the cache key.  k >= C decodes the exact logits.
    """

    k: int
    temperature: float = 1.0

    def facts(self) -> dict[str, object]:
        return {"codec": "topk", "k": self.k, "temperature": self.temperature}

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        logits = logits.float()
        values, classes = logits.topk(min(self.k, logits.shape[1]), dim=1)
        tail = logits.scatter(1, classes, -math.inf)  # the top k masked out
        tail_logsumexp = self.temperature * (tail.double() / self.temperature).logsumexp(dim=1)
        return {"values": values, "classes": classes.to(torch.int32), "tail_logsumexp": tail_logsumexp.float()}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        values, classes = columns["values"], columns["classes"].long()
        others = num_classes - values.shape[1]
        if others == 0:
            return torch.empty_like(values).scatter_(1, classes, values)
        # (C-k) * exp(fill / tau) = exp(tail_logsumexp / tau): the tail's tempered mass, shared evenly.
        fill = columns["tail_logsumexp"].double() - self.temperature * math.log(others)
        logits = fill.unsqueeze(1).expand(len(values), num_classes).to(values.dtype).clone()
        return logits.scatter_(1, classes, values)


CODECS: dict[str, Callable[[], LogitCodec]] = {"fp32": FullLogits, "fp16": HalfLogits, "int8": Int8Logits}
DEFAULT_CACHE_CODEC = "fp16"  # from benchmarks/bench_cache_topk.py: half of fp32, KD gradient off by ~1e-4 (docs/teacher-cache.md)


def table_bytes(columns: dict[str, Tensor]) -> int:
    return sum(column.numel() * column.element_size() for column in columns.values())


class CachedTeacher(FrozenTeacher):
    """A frozen teacher whose logits on training batches come from a per-sample table.

    ``per_epoch``: one table per epoch (random, replayable augmentation) instead
    of one for the run. ``codec`` chooses what a row keeps (all logits, or the
    top k). ``all_reduce_sum`` sums a tensor over processes (identity
    in a single process); only the process with ``writes`` saves files.
    """

    def __init__(
        self,
        network: nn.Module,
        *,
        teacher_path: Path,
        key: str,
        num_samples: int,
        per_epoch: bool,
        codec: LogitCodec | None = None,
        renormalize: Renormalization | None = None,
        all_reduce_sum: Callable[[Tensor], Tensor] = lambda tensor: tensor,
        writes: bool = True,
    ) -> None:
        super().__init__(network, renormalize)
        if writes:
            check_writable(teacher_path)
        self.teacher_path = teacher_path
        self.key = key
        self.num_samples = num_samples
        self.per_epoch = per_epoch
        self.codec = codec or FullLogits()
        self._all_reduce_sum = all_reduce_sum
        self._writes = writes
        self._columns: dict[str, Tensor] | None = None  # [N, ...] each, created by the first teacher output or a loaded file
        self._num_classes = 0
        self._filled: Tensor | None = None  # bool [N]: rows of the columns that hold the teacher's output
        self._fresh: Tensor | None = None  # bool [N]: rows computed in this epoch by this process
        self._complete = False  # every row filled: known without asking the device
        self._table_epoch: int | None = None  # the epoch whose table is loaded (per_epoch); 0: the run's table
        self._hits = 0
        self._computed = 0

    # -- the teacher source ---------------------------------------------------------------------

    # Never compiled (only the student's forward is): the lookup reads which rows are filled on the host.
    def logits(self, batch: Batch) -> Tensor:
        """A training batch of the current table's epoch from the table; any other batch from the network."""
        if batch.epoch is None or self._table_epoch != self._table_of(batch.epoch):
            return super().logits(batch)
        return self._lookup(batch.index, batch.inputs)

    def logits_and_features(self, inputs: Tensor, indices: Sequence[int]) -> NoReturn:
        self._only_logits()

    def module_features(self, inputs: Tensor, names: Sequence[str]) -> NoReturn:
        self._only_logits()

    def features(self, inputs: Tensor, indices: Sequence[int]) -> NoReturn:
        self._only_logits()

    def feature_shapes(self, input_size: tuple[int, int, int]) -> NoReturn:
        self._only_logits()

    def _only_logits(self) -> NoReturn:
        raise TeacherCacheError(
            "the method reads the teacher's features, but the teacher cache (train.cache_teacher) keeps only "
            "the teacher's logits; run this method without it"
        )

    def on_epoch_start(self, epoch: int) -> None:
        """Make the table of ``epoch`` current: loaded from its file, or empty."""
        table_epoch = self._table_of(epoch)
        if table_epoch != self._table_epoch:
            self._table_epoch = table_epoch
            self._columns, self._filled, self._complete = None, None, False
            self._load(self._path(table_epoch))
        if self._filled is not None:
            self._fresh = torch.zeros_like(self._filled)
        self._hits = self._computed = 0

    def on_epoch_end(self, epoch: int) -> dict[str, int]:
        """Merge what every process computed, save the table if it grew; report hits, computed samples, table size."""
        counts = self._all_reduce_sum(torch.tensor([self._hits, self._computed], dtype=torch.float64, device=self._device()))
        hits, computed = (int(value) for value in counts.tolist())
        if computed:
            self._merge_fresh_rows()
            self._complete = bool(self._filled.all())
            if self._writes:
                self._save(self._path(self._table_epoch))
        size = 0 if self._columns is None else table_bytes(self._columns)
        return {"hits": hits, "computed": computed, "table_bytes": size}

    # -- internals ------------------------------------------------------------------------------

    def _table_of(self, epoch: int) -> int:
        return epoch if self.per_epoch else 0

    def _path(self, table_epoch: int | None) -> Path:
        return cache_path(self.teacher_path, self.key, table_epoch if self.per_epoch else None)

    @torch.no_grad()
    def _run_teacher(self, inputs: Tensor) -> Tensor:
        return self.network(self.own_inputs(inputs))

    def _lookup(self, index: Tensor, inputs: Tensor) -> Tensor:
        if not self._complete:
            missing = self._missing_rows(index)
            if missing.numel() == len(index):
                self._store(index, self._run_teacher(inputs))  # the whole batch: exactly the uncached computation
            elif missing.numel():
                self._store(index[missing], self._run_teacher(inputs[missing]))
            self._computed += missing.numel()
            self._hits += len(index) - missing.numel()
        else:
            self._hits += len(index)
        return self.codec.decode({name: column[index] for name, column in self._columns.items()}, self._num_classes)

    def _missing_rows(self, index: Tensor) -> Tensor:
        """Positions within the batch whose samples have no stored logits (asks the device)."""
        if self._filled is None:
            return torch.arange(len(index), device=index.device)
        return (~self._filled[index]).nonzero().squeeze(1)

    def _store(self, rows: Tensor, logits: Tensor) -> None:
        encoded = self.codec.encode(logits)
        if self._columns is None:
            self._allocate(encoded, logits.shape[1], logits.device)
        for name, value in encoded.items():
            self._columns[name][rows] = value.to(self._columns[name].dtype)
        self._filled[rows] = True
        self._fresh[rows] = True

    def _allocate(self, encoded: dict[str, Tensor], num_classes: int, device: torch.device) -> None:
        self._columns = {
            name: torch.zeros(self.num_samples, *value.shape[1:], dtype=value.dtype, device=device) for name, value in encoded.items()
        }
        self._num_classes = num_classes
        self._filled = torch.zeros(self.num_samples, dtype=torch.bool, device=device)
        self._fresh = torch.zeros_like(self._filled)

    def _merge_fresh_rows(self) -> None:
        """Give every process the rows any process computed; rows computed twice are averaged.

        Every process trains the same number of batches, and one without a table
        misses on all of them, so each process has a table here.
        """
        counts = self._all_reduce_sum(self._fresh.double())
        computed = counts > 0
        for name, column in self._columns.items():
            shape = (-1,) + (1,) * (column.dim() - 1)
            fresh, count = self._fresh.view(shape), counts.view(shape)
            sums = self._all_reduce_sum(torch.where(fresh, column.double(), 0.0))
            merged = torch.where(computed.view(shape), sums / count.clamp(min=1), column.double())
            self._columns[name] = (merged.round() if not column.is_floating_point() else merged).to(column.dtype)
        self._filled |= computed

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            stored = load_state(path)
        except KdcliError:
            return  # unreadable: recomputed and replaced
        columns, filled, num_classes = stored.get("columns"), stored.get("filled"), stored.get("num_classes")
        if stored.get("key") != self.key or not isinstance(columns, dict) or filled is None or len(filled) != self.num_samples:
            return  # another table under a colliding name: recomputed and replaced
        device = self._device()
        self._columns = {name: column.to(device) for name, column in columns.items()}
        self._num_classes, self._filled = int(num_classes), filled.to(device)
        self._complete = bool(self._filled.all())

    def _save(self, path: Path) -> None:
        state = {"key": self.key, "columns": self._columns, "num_classes": self._num_classes, "filled": self._filled}
        save_state(path, state)

    def _device(self) -> torch.device:
        parameter = next(self.network.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
