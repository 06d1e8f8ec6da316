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

from kdcli.checkpoint import atomic_write_bytes
from kdcli.config import RunConfig
from kdcli.errors import KdcliError, ResumeHint, UsageError
from kdcli.jobs.build import RunSpec, resolve_run
from kdcli.jobs.train import Notify, train
from kdcli.results import SEED_GROUP_MANIFEST, aggregate, final_metrics, seed_dir
from kdcli.rundir import check_replaceable, is_kdcli_run, remove_run

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


def prepare_group_dir(out: Path, config: RunConfig, seeds: list[int], *, overwrite: bool) -> None:
    """A new group directory, or the same recipe's group to continue; anything else is refused."""
    manifest = out / SEED_GROUP_MANIFEST
    record = {"format": SEEDS_FORMAT, "recipe": _recipe(config), "seeds": seeds}
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not manifest.is_file():
            raise UsageError(f"run directory {out} already exists and is not a seed group; choose another run directory or overwrite it")
        saved = _read_manifest(out)
        if saved.get("format") != SEEDS_FORMAT or saved.get("recipe") != record["recipe"]:
            raise UsageError(f"{out} holds a seed group with a different config; choose another run directory or overwrite it")
    elif out.exists() and overwrite and any(out.iterdir()):
        _remove_group(out, config)
    atomic_write_bytes(manifest, (json.dumps(record, indent=2) + "\n").encode())


def _remove_group(out: Path, config: RunConfig) -> None:
    """Only what kdcli wrote: the manifest and each seed's run (a user's files stay); refused for other folders."""
    reads = () if config.teacher is None or str(config.teacher).startswith("timm:") else (config.teacher,)
    check_replaceable(out, reads, marker=SEED_GROUP_MANIFEST)
    for run in out.glob("seed-*"):
        if is_kdcli_run(run):
            remove_run(run)
    (out / SEED_GROUP_MANIFEST).unlink()


def _read_manifest(out: Path) -> dict[str, Any]:
    manifest = out / SEED_GROUP_MANIFEST
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the seed group's {manifest}: {exc}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{manifest} is not a kdcli seed group manifest")
    return saved


def is_seed_group(out: Path) -> bool:
    return (out / SEED_GROUP_MANIFEST).is_file()


def saved_group(out: Path) -> tuple[RunConfig, list[int]]:
    """The recipe and seeds saved in a seed group (to continue it with ``--resume``)."""
    saved = _read_manifest(out)
    try:
        return RunConfig.model_validate(saved["recipe"]), [int(seed) for seed in saved["seeds"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{out / SEED_GROUP_MANIFEST} is not a valid seed group manifest: {exc}") from None


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
    """Train ``config`` once per seed into ``out/seed-N`` (finished seeds are read back)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"give distinct seeds (got {seeds})")
    spec = resolve_run(config)  # a wrong method or hyperparameter fails before any directory is made
    prepare_group_dir(out, spec.config, seeds, overwrite=overwrite)
    summaries = {}
    for seed in seeds:
        summary, read_back = _one_seed(spec, out, seed, show_progress, notify)
        summaries[seed] = summary
        if on_seed is not None:
            on_seed(seed, summary, read_back)
    return SeedGroupResult(out, spec.config.job, str(spec.config.method.name), summaries)


def _one_seed(spec: RunSpec, out: Path, seed: int, show_progress: bool, notify: Notify | None) -> tuple[dict[str, Any], bool]:
    run = seed_dir(out, seed)
    finished = run / "summary.json"
    if finished.is_file():
        return json.loads(finished.read_text(encoding="utf-8")), True
    config = spec.config.model_copy(update={"train": spec.config.train.model_copy(update={"seed": seed})})
    resumable = (run / "config.json").is_file()
    try:
        summary = train(RunSpec(config, spec.method, spec.params), run, resume=resumable, overwrite=not resumable,
                        show_progress=show_progress, notify=notify)
    except KdcliError as exc:
        if exc.resume is None:
            raise
        # The seed run's own hint (--resume GROUP/seed-N) would continue that seed alone.
        raise KdcliError(f"{exc} (seed {seed})", exit_code=exc.exit_code, resume=ResumeHint(exc.resume.job, out, exc.resume.lead)) from None
    return summary.as_dict(), False
