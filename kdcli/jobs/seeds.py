"""One recipe, several training seeds: a run per seed under ``GROUP/seed-N/`` and their mean ± std.

Group directory::

    GROUP/seeds.json        the recipe (its seed left out); a rerun must use the same one
    GROUP/seed-N/           an ordinary teach/distill run with train.seed = N
    GROUP/seed-N/summary.json   written when that run finished: the seed is not trained again

Rerunning the same command (or ``--resume GROUP``) continues: finished seeds
are read back, an interrupted seed resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdcli.config import RunConfig, format_validation_error
from kdcli.defaults import MAX_SEED
from kdcli.errors import KdcliError, ResumeHint, UsageError
from kdcli.files import atomic_write_bytes, check_target
from kdcli.jobs.build import RunSpec, resolve_run
from kdcli.jobs.train import Notify, plan_training, train
from kdcli.results import SEED_GROUP_MANIFEST, aggregate, final_metrics, read_json, read_summary, seed_dir
from kdcli.rundir import check_creatable, check_replaceable, is_kdcli_run, remove_run

SEEDS_FORMAT = "kdcli-seeds"
SeedCallback = Callable[[int, dict[str, Any], bool], None]  # seed, its summary, whether it was read back


@dataclass
class SeedGroupResult:
    """Each seed's summary and the mean ± std of every final metric."""

    out: Path
    job: str
    method: str
    summaries: dict[int, dict[str, Any]]

    @property
    def per_seed(self) -> dict[int, dict[str, float]]:
        return {seed: final_metrics(summary) for seed, summary in self.summaries.items()}

    @property
    def aggregate(self) -> dict[str, dict[str, float]]:
        return aggregate(self.per_seed)

    def as_dict(self) -> dict[str, Any]:
        per_seed = self.per_seed
        return {
            "group_dir": str(self.out),
            "job": self.job,
            "method": self.method,
            "seeds": list(self.summaries),
            "per_seed": {name: {str(seed): values[name] for seed, values in per_seed.items()} for name in self.aggregate},
            "aggregate": self.aggregate,
            "runs": {str(seed): summary for seed, summary in self.summaries.items()},
        }


def _recipe(config: RunConfig) -> dict[str, Any]:
    """The config every seed shares: the seed itself left out."""
    recipe = config.model_dump(mode="json")
    recipe["train"].pop("seed", None)
    return recipe


def prepare_group_dir(out: Path, config: RunConfig, seeds: list[int], *, overwrite: bool) -> bytes | None:
    """Check ``out`` (a new group, the same recipe's group to continue, or with ``overwrite`` a group kdcli made),
    then record the recipe; returns the index it replaced, to put back if no seed gets to train.

    Nothing is deleted here: with ``overwrite`` each seed's old run is replaced the way a single run is, once
    the new run saved its first state, so a run refused on the way leaves the old results as they were.
    """
    manifest = out / SEED_GROUP_MANIFEST
    record = check_group_dir(out, config, seeds, overwrite=overwrite)
    previous = manifest.read_bytes() if manifest.is_file() else None
    atomic_write_bytes(manifest, (json.dumps(record, indent=2) + "\n").encode())
    return previous


def check_group_dir(out: Path, config: RunConfig, seeds: list[int], *, overwrite: bool) -> dict[str, Any]:
    """Everything ``prepare_group_dir`` checks, without writing; returns the index it would record."""
    record = {"format": SEEDS_FORMAT, "recipe": _recipe(config), "seeds": seeds}
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory")
    check_creatable(out)
    check_target(out / SEED_GROUP_MANIFEST)
    if out.exists() and any(out.iterdir()):
        _check_existing_group(out, config, record, overwrite=overwrite)
        _check_seed_dirs(out, seeds)
    return record


def plan_seeds(config: RunConfig, out: Path, seeds: list[int], *, overwrite: bool) -> dict[str, Any]:
    """What ``run_seeds`` would do, checked as far as it goes without writing: the group, and its first seed's plan."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"give distinct seeds (got {seeds})")
    spec = resolve_run(config)
    check_group_dir(out, spec.config, seeds, overwrite=overwrite)
    first = config.model_copy(update={"train": config.train.model_copy(update={"seed": seeds[0]})})
    planned = plan_training(first, seed_dir(out, seeds[0]), overwrite=True)  # a seed's own run is replaced when stale
    action = "continue" if is_seed_group(out) and not overwrite else "replace" if is_seed_group(out) else "create"
    planned["plan"].update(run_dir=str(out), action=action, seeds=seeds, seed_dirs=[str(seed_dir(out, seed)) for seed in seeds])
    return planned


def _check_existing_group(out: Path, config: RunConfig, record: dict[str, Any], *, overwrite: bool) -> None:
    """A non-empty ``out``: with ``overwrite`` a group kdcli made (not holding the teacher), else the same recipe's group."""
    if overwrite:
        reads = () if config.teacher is None or str(config.teacher).startswith("timm:") else (config.teacher,)
        check_replaceable(out, reads, marker=SEED_GROUP_MANIFEST)
        return
    if not (out / SEED_GROUP_MANIFEST).is_file():
        raise UsageError(f"run directory {out} already exists and is not a seed group; choose another run directory or overwrite it")
    saved = _read_manifest(out)
    if saved.get("format") != SEEDS_FORMAT or saved.get("recipe") != record["recipe"]:
        raise UsageError(f"{out} holds a seed group with a different config; choose another run directory or overwrite it")


def _check_seed_dirs(out: Path, seeds: list[int]) -> None:
    """Every seed's folder is free or a kdcli run: checked for all seeds before the first one trains."""
    for seed in seeds:
        run = seed_dir(out, seed)
        if run.exists() and (not run.is_dir() or (any(run.iterdir()) and not is_kdcli_run(run))):
            raise UsageError(f"refusing to train seed {seed} into {run}: it exists and kdcli did not create it")


def _restore_index(out: Path, previous: bytes | None, *, created: bool) -> None:
    """No seed trained: the group's index goes back to what it was (a new group's index goes, and its folder)."""
    manifest = out / SEED_GROUP_MANIFEST
    if previous is not None:
        atomic_write_bytes(manifest, previous)
        return
    manifest.unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _remove_dropped_seeds(out: Path, seeds: list[int]) -> None:
    """After an overwrite finished: the old group's seeds that the new one does not have (kdcli runs only)."""
    kept = {seed_dir(out, seed).name for seed in seeds}
    for run in out.glob("seed-*"):
        if run.name not in kept and is_kdcli_run(run):
            remove_run(run)


def _read_manifest(out: Path) -> dict[str, Any]:
    manifest = out / SEED_GROUP_MANIFEST
    saved = read_json(manifest, "a seed group index")
    if not isinstance(saved, dict):
        raise UsageError(f"{manifest} is not a kdcli seed group manifest")
    return saved


def is_seed_group(out: Path) -> bool:
    return (out / SEED_GROUP_MANIFEST).is_file()


def saved_group(out: Path) -> tuple[RunConfig, list[int]]:
    """The recipe and seeds saved in a seed group (to continue it with ``--resume``)."""
    saved = _read_manifest(out)
    seeds = saved.get("seeds")
    if not isinstance(seeds, list) or not all(type(seed) is int and 0 <= seed <= MAX_SEED for seed in seeds):
        raise UsageError(f"{out / SEED_GROUP_MANIFEST} is not a valid seed group manifest: 'seeds' must list seeds 0..{MAX_SEED}")
    try:
        return RunConfig.model_validate(saved.get("recipe")), seeds
    except ValidationError as exc:
        raise UsageError(f"{out / SEED_GROUP_MANIFEST} is not a valid seed group manifest: {format_validation_error(exc)}") from None


def run_seeds(
    config: RunConfig,
    out: Path,
    seeds: list[int],
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    notify: Notify | None = None,
    on_seed: SeedCallback | None = None,
) -> SeedGroupResult:
    """Train ``config`` once per seed into ``out/seed-N`` (finished seeds of the same recipe are read back)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"give distinct seeds (got {seeds})")
    spec = resolve_run(config)  # a wrong method or hyperparameter fails before any directory is made
    created = not out.exists()
    previous = prepare_group_dir(out, spec.config, seeds, overwrite=overwrite)
    recipe = _recipe(spec.config)
    summaries: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        try:
            summary, read_back = _one_seed(spec, recipe, out, seed, show_progress, notify)
        except KdcliError as exc:
            if not summaries and exc.resume is None:
                _restore_index(out, previous, created=created)  # refused before any seed trained: the group is as it was
            raise
        summaries[seed] = summary
        if on_seed is not None:
            on_seed(seed, summary, read_back)
    if overwrite:
        _remove_dropped_seeds(out, seeds)
    return SeedGroupResult(out, spec.config.job, str(spec.config.method.name), summaries)


def _same_recipe(run: Path, recipe: dict[str, Any]) -> bool:
    """Whether a seed's run was trained from ``recipe`` (an overwrite may have left older seeds of another)."""
    saved = read_json(run / "config.json", "a run config")
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        return False
    return {**saved, "train": {key: value for key, value in saved["train"].items() if key != "seed"}} == recipe


def _one_seed(spec: RunSpec, recipe: dict[str, Any], out: Path, seed: int, show_progress: bool, notify: Notify | None) -> tuple[dict[str, Any], bool]:
    run = seed_dir(out, seed)
    current = (run / "config.json").is_file() and _same_recipe(run, recipe)
    finished = run / "summary.json"
    if current and finished.is_file():
        summary = read_summary(finished)
        if isinstance((summary.get("test") or {}).get("top1"), (int, float)):
            return summary, True
        # A summary without its test top-1 is no finished run: resuming rewrites it from the saved state.
    config = spec.config.model_copy(update={"train": spec.config.train.model_copy(update={"seed": seed})})
    try:
        summary = train(RunSpec(config, spec.method, spec.params), run, resume=current, overwrite=not current,
                        show_progress=show_progress, notify=notify)
    except KdcliError as exc:
        if exc.resume is None:
            raise
        # The seed run's own hint (--resume GROUP/seed-N) would continue that seed alone.
        raise KdcliError(f"{exc} (seed {seed})", exit_code=exc.exit_code, resume=ResumeHint(exc.resume.job, out, exc.resume.lead)) from None
    return summary.as_dict(), False
