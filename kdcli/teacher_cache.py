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
split's pixels and labels, normalization, augmentation, seed and precision, so
any change of those starts a new table.

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

# Bump when the meaning or layout of a stored table changes (how augmentation is drawn or seeded; 2: columns).
CACHE_FORMAT = 2
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
    teacher_path: Path, train: Split, augment: Augment, *, seed: int, precision: str, topk: int | None = None
) -> str:
    """What the stored logits are a function of, hashed to 16 hex digits."""
    facts = {
        "topk": topk,
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
    """How a batch of teacher logits becomes per-sample table columns, and back."""

    def encode(self, logits: Tensor) -> dict[str, Tensor]: ...

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor: ...


class FullLogits:
    """The exact logits: one row of C numbers per sample."""

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        return {"logits": logits}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        return columns["logits"]


@dataclass(frozen=True)
class TopKLogits:
    """The k largest logits, their classes and the log-partition: k*(4+4)+4 bytes a sample instead of 4*C.

    Decoding keeps the top-k probabilities exact (at temperature 1) and spreads
    the remaining mass evenly over the other classes, so a KD loss can still be
    evaluated; ``benchmarks/bench_cache_topk.py`` reports its error.
    """

    k: int

    def encode(self, logits: Tensor) -> dict[str, Tensor]:
        values, classes = logits.topk(min(self.k, logits.shape[1]), dim=1)
        return {"values": values, "classes": classes.to(torch.int32), "logsumexp": logits.float().logsumexp(dim=1)}

    def decode(self, columns: dict[str, Tensor], num_classes: int) -> Tensor:
        values, classes, logsumexp = columns["values"], columns["classes"].long(), columns["logsumexp"]
        others = num_classes - values.shape[1]
        if others == 0:
            return torch.empty_like(values).scatter_(1, classes, values)
        top_mass = (values.float() - logsumexp.unsqueeze(1)).exp().sum(dim=1)
        rest = (1.0 - top_mass).clamp(min=torch.finfo(torch.float32).tiny)
        fill = logsumexp + rest.log() - math.log(others)  # each other class: an equal share of the rest
        logits = fill.unsqueeze(1).expand(len(values), num_classes).to(values.dtype).clone()
        return logits.scatter_(1, classes, values)


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
