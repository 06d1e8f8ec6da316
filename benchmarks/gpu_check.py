"""``make gpu-check``: the CUDA tests, then CIFAR-100 KD speed against a RepDistiller-style loop, in one run.

Made to fit in 8 minutes on one GPU.  It writes ``gpu_check.json`` and
``gpu_check.log`` under ``--out`` (``$OUT`` when set) and prints the table
last; a measurement that fails is recorded as such and the others go on.  The workload is issue 14's: resnet32x4 -> resnet8x4 KD on
CIFAR-100-shaped synthetic data (50,000 x 3x32x32, 100 classes), random crop
(padding 4) and flip, batch 64 and 256, in fp32, bf16, bf16+channels_last and
bf16+channels_last+compile, each a real kdcli ``Trainer``; beside it, on the
same device and the same tensors, the loop RepDistiller runs (a CIFAR-style
Dataset with PIL transforms, a DataLoader with workers, fp32, a host sync per
step for its meters).  Each speed is the engine's own images/s over a timed
epoch of ``--images`` images after a warm-up epoch (torch.compile compiles in
the warm-up).  ``--device cpu --smoke`` is the same run scaled down, to prove
the script end to end on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks import gpu_methods
from benchmarks.common import gpu_utilization, machine, markdown_table, synchronize
from benchmarks.bench_engine import bare_loop_throughput
from benchmarks.harness import UNTRAINED_TEACHER, Workload, build_trainer
from benchmarks.repdistiller_loop import repdistiller_throughput
from kdcli.config import RunConfig
from kdcli.data.loading import EpochBatches
from kdcli.data.bundle import DataBundle
from kdcli.engine import Trainer
from kdcli.jobs.common import load_data

CIFAR100_TRAIN = 50_000
PROJECTED_EPOCHS = 240
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "bf16+channels_last+cudagraphs": {"precision": "bf16", "channels_last": True, "compile": True, "compile_mode": "reduce-overhead"},
    # The recipe features, each against the compiled row above: the EMA update and two micro-batches per step.
    "bf16+channels_last+compile+ema": {"precision": "bf16", "channels_last": True, "compile": True, "ema_decay": 0.999},
    "bf16+channels_last+compile+accumulate2": {"precision": "bf16", "channels_last": True, "compile": True, "accumulate_steps": 2},
}
DEFAULT_VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile", "bf16+channels_last+cudagraphs")
PACKAGES = ("torch", "torchvision", "timm", "typer", "rich", "safetensors", "pydantic", "pydantic-core", "pyyaml", "numpy", "pillow")


@dataclass(frozen=True)
class Settings:
    """What one check runs; the defaults are the GPU run, ``--smoke`` scales them down for a CPU."""

    device: str = "cuda"
    num_train: int = CIFAR100_TRAIN
    num_classes: int = 100
    batch_sizes: tuple[int, ...] = (64, 256)
    images: int = 20_000  # timed images per measurement
    warmup_steps: int = 30
    teacher: str = "cifar_resnet32x4"
    student: str = "cifar_resnet8x4"
    workers: int = 8  # RepDistiller's default num_workers
    budget_s: float = 400.0  # no new measurement (speed row or method) starts after this: the last (a compile) ends inside 8 minutes
    test_timeout_s: float = 270.0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    method_variant: str | None = "bf16+channels_last+compile"  # every method's step and compile counters; None: skipped
    method_batch_size: int = 256
    method_steps: int = 20  # per epoch, plus a smaller last batch
    profile_variant: str | None = "bf16+channels_last"  # profile.txt: where a step's host time goes; None: skipped
    profile_steps: int = 20


# A CPU compiles resnet32x4 -> resnet8x4 for minutes: the dry run takes the zoo's smaller pair.
SMOKE = {
    "num_train": 512, "batch_sizes": (16, 32), "images": 64, "warmup_steps": 1, "workers": 2, "test_timeout_s": 300.0,
    "teacher": "cifar_resnet8x4", "student": "cifar_resnet8", "budget_s": 1500.0, "method_batch_size": 16, "method_steps": 2,
    "profile_steps": 2,
}


@dataclass
class Result:
    """One loop at one batch size."""

    loop: str
    batch_size: int
    images_per_s: float | None = None
    warmup_s: float | None = None
    data_share: float | None = None  # time share of data loading and augmentation
    gpu_utilization: float | None = None  # mean percent while timed
    ratio_to_repdistiller: float | None = None
    ratio_to_bare_loop: float | None = None  # kdcli fp32 against it is the engine's overhead
    projected_240_epochs_min: float | None = None  # at 50,000 images per epoch, warm-up excluded
    skipped: str | None = None


class Log:
    """Prints and keeps every line in ``gpu_check.log``."""

    def __init__(self, path: Path) -> None:
        self.handle = path.open("w", encoding="utf-8")

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        self.handle.write(text + "\n")
        self.handle.flush()


def run_cuda_tests(settings: Settings, log: Log) -> dict[str, Any]:
    """``pytest -m cuda`` in a fresh process; its output goes into the log, its counts into the JSON."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=settings.test_timeout_s)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        log(output)
        return {"returncode": None, "timed_out": True, "seconds": round(time.perf_counter() - started, 1)}
    log(completed.stdout + completed.stderr)
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", completed.stdout)}
    return {"returncode": completed.returncode, "timed_out": False, "seconds": round(time.perf_counter() - started, 1), **counts}


def synthetic_cifar100(settings: Settings) -> DataBundle:
    """CIFAR-100's shape from the synthetic generator: 4 latent features per class, 32x32."""
    return load_data(run_config(settings, 64, "fp32").data)


def run_config(settings: Settings, batch_size: int, variant: str) -> RunConfig:
    synthetic = {"num_train": settings.num_train, "num_test": 100, "num_classes": settings.num_classes,
                 "vocab_size": 4 * settings.num_classes, "image_size": 32}
    return RunConfig.model_validate({
        "job": "distill",
        "method": {"name": "kd"},
        "model": {"name": settings.student},
        "teacher": UNTRAINED_TEACHER,  # build_trainer writes an untrained teacher there and points the run at it
        "data": {"val_split": 0.0, "crop_padding": 4, "hflip": True, "synthetic": synthetic},
        "train": {"batch_size": batch_size, "epochs": 2, "device": settings.device, **VARIANTS.get(variant, {})},
    })


class FirstSteps:
    """Epochs cut to their first ``steps`` batches: an epoch of the benchmark's length for the real ``Trainer``."""

    def __init__(self, epochs: EpochBatches, steps: int) -> None:
        self.epochs, self.steps = epochs, steps

    def __len__(self) -> int:
        return min(self.steps, len(self.epochs))

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return itertools.islice(self.epochs.batches(epoch, start), max(0, len(self) - start))

    def epoch_stats(self) -> dict[str, int]:
        return self.epochs.epoch_stats()


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def data_seconds(trainer: Trainer, epoch: int) -> float:
    """The data path of one (cut) epoch alone: gather, per-sample crop and flip, normalize, layout."""
    device = trainer.runtime.device
    synchronize(device)
    started = time.perf_counter()
    for inputs, _, _ in trainer.train_loader.batches(epoch, 0):
        if trainer.config.train.channels_last:
            inputs.contiguous(memory_format=torch.channels_last)
    synchronize(device)
    return time.perf_counter() - started


def kdcli_throughput(settings: Settings, bundle: DataBundle, batch_size: int, variant: str) -> Result:
    """A real ``Trainer``: a warm-up epoch, then a timed epoch of ``settings.images`` images."""
    workload = Workload(teacher=settings.teacher, student=settings.student, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(run_config(settings, batch_size, variant), workload, Path(scratch), bundle=bundle)
        trainer.train_loader = FirstSteps(trainer.train_loader, settings.warmup_steps)
        started = time.perf_counter()
        trainer.train_epoch(1)
        warmup = time.perf_counter() - started
        trainer.train_loader = FirstSteps(trainer.train_loader.epochs, max(1, settings.images // batch_size))
        with gpu_utilization(trainer.runtime.device) as samples:
            record = trainer.train_epoch(2)
        data = data_seconds(trainer, 3)
    images_per_s = record["samples_per_s"]
    return Result(
        f"kdcli {variant}", batch_size, images_per_s, round(warmup, 1), round(data / record["time_s"], 3), mean(samples)
    )


def measure(settings: Settings, bundle: DataBundle, log: Log, deadline: float) -> list[Result]:
    """Every loop at every batch size, the RepDistiller-style loop first; none starts after the deadline."""
    results = []
    for batch_size in settings.batch_sizes:
        jobs: list[tuple[str, Callable[[], Result]]] = [
            ("repdistiller-style", lambda size=batch_size: repdistiller_result(settings, bundle, size)),
            (BARE_LOOP, lambda size=batch_size: bare_loop_result(settings, size)),
        ]
        jobs += [
            (f"kdcli {variant}", lambda size=batch_size, variant=variant: kdcli_throughput(settings, bundle, size, variant))
            for variant in settings.variants
        ]
        for name, job in jobs:
            if time.monotonic() > deadline:
                results.append(Result(name, batch_size, skipped="time budget spent"))
                continue
            try:
                results.append(job())
            except Exception as exc:  # noqa: BLE001 - one failing loop must not cost the others' numbers
                results.append(Result(name, batch_size, skipped=f"failed: {type(exc).__name__}: {exc}"[:500]))
            log(f"  {describe(results[-1])}")
    return with_ratios(results)


def repdistiller_result(settings: Settings, bundle: DataBundle, batch_size: int) -> Result:
    timing = repdistiller_throughput(
        bundle, teacher=settings.teacher, student=settings.student, batch_size=batch_size, workers=settings.workers,
        warmup_steps=settings.warmup_steps, steps=max(1, settings.images // batch_size), device=torch.device(settings.device),
    )
    return Result("repdistiller-style", batch_size, timing.images_per_s, round(timing.warmup_s, 1), round(timing.data_share, 3), timing.gpu_utilization)


BARE_LOOP = "bare loop (eager fp32)"


def bare_loop_result(settings: Settings, batch_size: int) -> Result:
    """The minimal hand-written KD loop on the same models: what kdcli's engine is measured against."""
    workload = Workload(
        teacher=settings.teacher, student=settings.student, batch_size=batch_size,
        steps=max(1, settings.images // batch_size), num_classes=settings.num_classes,
    )
    return Result(BARE_LOOP, batch_size, bare_loop_throughput(workload))


def profile_steps(settings: Settings, bundle: DataBundle, out: Path) -> str | None:
    """A torch.profiler table (by self CPU time) of ``profile_steps`` warm steps at the first batch size."""
    if settings.profile_variant is None:
        return None
    batch_size = settings.batch_sizes[0]
    workload = Workload(teacher=settings.teacher, student=settings.student, batch_size=batch_size)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if settings.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(run_config(settings, batch_size, settings.profile_variant), workload, Path(scratch), bundle=bundle)
        trainer.train_loader = FirstSteps(trainer.train_loader, settings.warmup_steps)
        trainer.train_epoch(1)
        trainer.train_loader = FirstSteps(trainer.train_loader.epochs, settings.profile_steps)
        with torch.profiler.profile(activities=activities) as profiler:
            trainer.train_epoch(2)
    text = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    heading = f"{settings.profile_steps} steps of kdcli {settings.profile_variant}, batch {batch_size}, {settings.teacher} -> {settings.student}"
    (out / "profile.txt").write_text(f"{heading}\n{text}\n", encoding="utf-8")
    return heading


def with_ratios(results: list[Result]) -> list[Result]:
    """Each loop against the RepDistiller-style loop at its batch size, and 240 epochs of 50,000 images."""
    def speeds(loop: str) -> dict[int, float | None]:
        return {result.batch_size: result.images_per_s for result in results if result.loop == loop}

    def ratio(speed: float, baseline: float | None) -> float | None:
        return round(speed / baseline, 2) if baseline else None

    repdistiller, bare = speeds("repdistiller-style"), speeds(BARE_LOOP)
    finished = []
    for result in results:
        if result.images_per_s:
            result = replace(
                result,
                ratio_to_repdistiller=ratio(result.images_per_s, repdistiller.get(result.batch_size)),
                ratio_to_bare_loop=ratio(result.images_per_s, bare.get(result.batch_size)),
                projected_240_epochs_min=round(PROJECTED_EPOCHS * CIFAR100_TRAIN / result.images_per_s / 60, 1),
            )
        finished.append(result)
    return finished


def describe(result: Result) -> str:
    if result.skipped:
        return f"{result.loop:<30} batch {result.batch_size:>4}: skipped ({result.skipped})"
    return f"{result.loop:<30} batch {result.batch_size:>4}: {result.images_per_s:,.0f} images/s, warm-up {result.warmup_s} s"


def table(results: list[Result]) -> str:
    """The Markdown table of the closing note."""
    header = ["loop", "batch", "images/s", "x RepDistiller-style", "x bare loop", "data share", "GPU util %", "240 epochs (min)"]
    return markdown_table(header, [row_cells(result) for result in results])


def row_cells(result: Result) -> list[object]:
    if result.skipped:
        return [result.loop, result.batch_size, f"skipped: {result.skipped}", "", "", "", "", ""]
    return [
        result.loop, result.batch_size, f"{result.images_per_s:,.1f}", result.ratio_to_repdistiller, result.ratio_to_bare_loop,
        f"{result.data_share:.0%}" if result.data_share is not None else None,
        f"{result.gpu_utilization:.0f}" if result.gpu_utilization is not None else None, result.projected_240_epochs_min,
    ]


def packages() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def goals(results: list[Result]) -> dict[str, Any]:
    """Issue 14's targets: 240 epochs in 5 minutes on one H200 (15 on an H100), 10x the RepDistiller-style loop."""
    timed = [result for result in results if result.images_per_s and result.loop.startswith("kdcli")]
    if not timed:
        return {}
    best = max(timed, key=lambda result: result.images_per_s)
    return {
        "fastest": f"{best.loop}, batch {best.batch_size}",
        "projected_240_epochs_min": best.projected_240_epochs_min,
        "ratio_to_repdistiller": best.ratio_to_repdistiller,
        "h200_5_min_met": best.projected_240_epochs_min is not None and best.projected_240_epochs_min <= 5,
        "ratio_10x_met": best.ratio_to_repdistiller is not None and best.ratio_to_repdistiller >= 10,
    }


def parse_settings(argv: list[str]) -> tuple[Settings, Path, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu-check"))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="scaled down (512 images, resnet8x4 -> resnet8, batch 16/32, 64 timed images): a CPU dry run")
    parser.add_argument("--num-train", type=int, help="training images (default 50,000)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 64,256)")
    parser.add_argument("--images", type=int, help="timed images per measurement (default 20,000)")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, help="start no measurement after this many seconds (default 400)")
    parser.add_argument("--method-variant", help=f"the variant every method is stepped in, one of {','.join(VARIANTS)}, or none")
    parser.add_argument("--profile-variant", help=f"the variant profiled into profile.txt, one of {','.join(VARIANTS)}, or none")
    parser.add_argument("--skip-tests", action="store_true", help="only the speed benchmark")
    args = parser.parse_args(argv)
    settings = Settings(device=args.device, **(SMOKE if args.smoke else {}))
    given = {"num_train": args.num_train, "images": args.images, "budget_s": args.budget_s,
             "batch_sizes": args.batch_sizes and tuple(int(size) for size in args.batch_sizes.split(",")),
             "variants": args.variants and tuple(args.variants.split(","))}
    settings = replace(settings, **{key: value for key, value in given.items() if value})
    for key in ("method_variant", "profile_variant"):
        if chosen := getattr(args, key):
            settings = replace(settings, **{key: None if chosen == "none" else chosen})
    unknown = (set(settings.variants) | {settings.method_variant or "fp32", settings.profile_variant or "fp32"}) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    return settings, args.out, args.skip_tests


def main(argv: list[str]) -> int:
    settings, out, skip_tests = parse_settings(argv)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    report: dict[str, Any] = {"machine": machine(), "packages": packages(), "settings": asdict(settings)}
    log(f"machine: {report['machine']}\npackages: {report['packages']}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: run with --device cpu --smoke for a dry run")
        return 2
    report["cuda_tests"] = {"skipped": "--skip-tests"} if skip_tests else run_cuda_tests(settings, log)
    log(f"cuda tests: {report['cuda_tests']}")
    write_report(out, report, started)  # each section as it ends: a run cut short by its time limit keeps its numbers
    bundle = synthetic_cifar100(settings)
    deadline = started + settings.budget_s
    results = measure(settings, bundle, log, deadline=deadline)
    report.update(results=[asdict(result) for result in results], goals=goals(results))
    write_report(out, report, started)
    methods = measure_methods(settings, log, deadline=deadline)
    report["methods"] = [asdict(row) for row in methods]
    write_report(out, report, started)
    report["profile"] = profile_steps(settings, bundle, out) if time.monotonic() < deadline else None
    write_report(out, report, started)
    log(f"\n{table(results)}\n\ngoals: {report['goals']}\n\n{gpu_methods.table(methods)}")
    log(f"\ntotal {report['total_s']} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")
    tests_ok = skip_tests or report["cuda_tests"].get("returncode") == 0
    failures = [item.skipped for item in [*results, *methods] if item.skipped and item.skipped.startswith("failed")]
    return 0 if tests_ok and not failures else 1


def write_report(out: Path, report: dict[str, Any], started: float) -> None:
    report["total_s"] = round(time.monotonic() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def measure_methods(settings: Settings, log: Log, deadline: float) -> list[gpu_methods.MethodRow]:
    """Every method's step in ``settings.method_variant`` (CIFAR-100's shape), after the speed table."""
    if settings.method_variant is None:
        return []
    log(f"every method, {settings.method_variant}, batch {settings.method_batch_size}:")
    workload = Workload(
        teacher=settings.teacher, student=settings.student, batch_size=settings.method_batch_size,
        steps=settings.method_steps, num_classes=settings.num_classes,
    )
    return gpu_methods.measure_methods(workload, {"device": settings.device, **VARIANTS[settings.method_variant]}, log, deadline)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
