"""Reading finished runs back: final metrics, best epochs, and mean ± std over seeds.

A run directory holds ``config.json``, ``metrics.jsonl`` (one record per epoch)
and, once training finished, ``summary.json`` (the job's summary, test metrics
included).  A seed group (one config trained with several seeds) holds ``seeds.json`` and one run
directory per seed, ``seed-N/``.  Everything here is read from those files.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcli.config import MAX_DEPTH, check_tree
from kdcli.errors import UsageError, one_line

_LARGEST_FLOAT = 1.7976931348623157e308  # an integer beyond this cannot become a float
SEED_GROUP_MANIFEST = "seeds.json"
SEED_DIR_PREFIX = "seed-"
# Epoch-record numbers that describe the run's speed or bookkeeping, not the model.
MAX_JSON_BYTES = 64 << 20  # a run's JSON files are kilobytes; a metrics.jsonl of 10^5 epochs is a few MiB
NOT_METRICS = frozenset({"epoch", "lr", "time_s", "samples_per_s", "skipped_steps"})


def seed_dir(group: Path, seed: int) -> Path:
    return group / f"{SEED_DIR_PREFIX}{seed}"


def _seed_of(child: Path) -> tuple[int | None, Path]:
    """The seed a ``seed-N`` folder holds; None for other names (``seed-03``, ``seed-x``): kdcli writes only ``seed-N``."""
    digits = child.name.removeprefix(SEED_DIR_PREFIX)
    if not (digits.isascii() and digits.isdigit()) or seed_dir(child.parent, int(digits)).name != child.name:
        return None, child
    return int(digits), child


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers as ``section/name`` keys (``loss/kd``, ``method/alpha_mean``); non-numbers dropped."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value) if abs(value) <= _LARGEST_FLOAT else math.copysign(math.inf, value)
    return flat


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    """An epoch record's model metrics: losses, accuracies, method numbers (not timing or lr)."""
    return {key: value for key, value in flatten(record).items() if key not in NOT_METRICS}


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A finished run's numbers: ``test/*`` on the deployed model, then the last epoch's."""
    final = {f"test/{key}": value for key, value in flatten(summary.get("test") or {}).items()}
    final.update(epoch_metrics(summary.get("final_epoch") or {}))
    return final


def best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the highest validation top-1 (None without a validation split)."""
    scored = [record for record in history if isinstance(record.get("val_top1"), (int, float))]
    if not scored:
        return None
    best = max(scored, key=lambda record: record["val_top1"])
    return {"epoch": best["epoch"], "val_top1": best["val_top1"]}


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (n-1; 0 for one seed) of each metric every seed reports."""
    names = [name for name in next(iter(per_seed.values()), {}) if all(name in values for values in per_seed.values())]
    result = {}
    for name in names:
        values = [metrics[name] for metrics in per_seed.values()]
        finite = [value for value in values if math.isfinite(value)]
        std = statistics.stdev(finite) if len(finite) > 1 else 0.0
        result[name] = {"mean": statistics.fmean(finite) if finite else math.nan, "std": std, "n": len(finite)}
    return result


def read_json(path: Path, what: str) -> Any:
    """A JSON file kdcli wrote, read as untrusted input: bounded in size and depth, one error line if broken."""
    return _parsed(_bounded_text(path, what), path, what)


def read_jsonl(path: Path, what: str) -> list[Any]:
    """One JSON value per non-empty line, with the same limits as ``read_json``."""
    return [_parsed(line, path, what) for line in _bounded_text(path, what).splitlines() if line.strip()]


def _bounded_text(path: Path, what: str) -> str:
    try:
        if not path.is_file():
            raise UsageError(f"cannot read {path}: not a regular file")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UsageError(f"cannot read {path}: larger than {MAX_JSON_BYTES >> 20} MiB, too large for {what}")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {one_line(str(exc))}") from None


def _parsed(text: str, path: Path, what: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"cannot read {path}: not valid JSON for {what} ({one_line(str(exc))})") from None
    except RecursionError:
        raise UsageError(f"cannot read {path}: {what} nested deeper than {MAX_DEPTH} levels") from None
    check_tree(value, str(path))
    return value


def _require(value: Any, kind: type, path: Path, what: str) -> Any:
    if not isinstance(value, kind):
        raise UsageError(f"cannot read {path}: {what} must be a JSON {'object' if kind is dict else kind.__name__}")
    return value


def read_history(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [_require(record, dict, path, "each epoch record") for record in read_jsonl(path, "epoch records")]
    for record in records:
        if not isinstance(record.get("epoch"), int) or isinstance(record.get("epoch"), bool):
            raise UsageError(f"cannot read {path}: an epoch record without an integer epoch")
    return records


def read_summary(path: Path) -> dict[str, Any]:
    summary = _require(read_json(path, "a run summary"), dict, path, "a run summary")
    for section in ("test", "final_epoch"):
        _require(summary.get(section) or {}, dict, path, f"its {section!r}")
    return summary


@dataclass
class RunRecord:
    """One run directory read back: its config, its epochs and (when finished) its summary."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @functools.cached_property
    def flat_history(self) -> list[tuple[int, dict[str, float]]]:
        """Each epoch and its record flattened, once (a method may log hundreds of numbers per epoch)."""
        return [(int(record["epoch"]), flatten(record)) for record in self.history]

    @property
    def final(self) -> dict[str, float]:
        if self.summary is not None:
            return final_metrics(self.summary)
        return epoch_metrics(self.history[-1]) if self.history else {}


@dataclass
class ResultSet:
    """What ``compare`` and ``plot`` show for one argument: a run, or a seed group (one run per seed)."""

    path: Path
    label: str
    runs: dict[int | None, RunRecord] = field(default_factory=dict)  # seed -> run; None for a single run

    @property
    def first(self) -> RunRecord:
        return next(iter(self.runs.values()))

    @property
    def is_group(self) -> bool:
        return None not in self.runs


def read_run(path: Path) -> RunRecord:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{path} is not a kdcli run directory (no config.json) nor a seed group (no {SEED_GROUP_MANIFEST})")
    summary_path = path / "summary.json"
    summary = read_summary(summary_path) if summary_path.exists() else None
    config = _require(read_json(config_path, "a run config"), dict, config_path, "a run config")
    return RunRecord(path, config, read_history(path), summary)


def read_results(path: Path) -> ResultSet:
    """A run directory or a seed group, with every seed run that has a config."""
    if not path.is_dir():
        raise UsageError(f"{path} is not a directory")
    if not (path / SEED_GROUP_MANIFEST).is_file():
        return ResultSet(path, path.name, {None: read_run(path)})
    seeds = sorted(seed for seed, child in map(_seed_of, path.glob(f"{SEED_DIR_PREFIX}*")) if seed is not None and (child / "config.json").is_file())
    if not seeds:
        raise UsageError(f"seed group {path} holds no seed runs yet")
    return ResultSet(path, path.name, {seed: read_run(seed_dir(path, seed)) for seed in seeds})
