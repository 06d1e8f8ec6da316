"""Teacher-free KD on the synthetic data set: baseline vs tfkd-self vs tfkd-virtual vs KD from a larger teacher.

Every student is a ``cifar_resnet8`` trained for the same number of epochs with
the same optimizer and schedule (kdcli's defaults); only the method differs.
The tfkd-self teacher is a ``standard`` cifar_resnet8 and the KD teacher a
``standard`` cifar_resnet20, each trained once (seed 100) for the same epochs.
Method hyperparameters are the methods' defaults: tfkd-* the official
MobileNetV2 settings, kd RepDistiller's (tau 4, 0.1 / 0.9).

    make experiment-tfkd                  # or: python examples/experiments/tfkd.py --epochs 20 --seeds 0 1 2

Prints mean ± std over seeds of test top-1 and ECE and writes OUT/results.json.
About 8 minutes on two otherwise idle CPU cores with the defaults (estimated from
per-epoch times).  On a machine shared with other jobs set OMP_NUM_THREADS=1: two
spinning intra-op threads per process on oversubscribed cores made training
more than 20 times slower here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from kdcli.config import build_config
from kdcli.jobs.train import TrainingSummary, run_training

STUDENT = "cifar_resnet8"
LARGER_TEACHER = "cifar_resnet20"
TEACHER_SEED = 100


def train(job: str, method: str, model: str, out: Path, args: argparse.Namespace, *, seed: int, teacher: Path | None = None) -> TrainingSummary:
    flags: dict[str, Any] = {
        "job": job,
        "method": {"name": method},
        "model": {"name": model},
        "train": {"epochs": args.epochs, "seed": seed},
        "data": {"synthetic": {"num_train": args.num_train}},
    }
    if teacher is not None:
        flags["teacher"] = str(teacher)
    return run_training(build_config(flags=flags), out, overwrite=True, show_progress=False)


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="Epochs of every run, teachers included.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student training seeds.")
    parser.add_argument("--num-train", type=int, default=10_000, help="Synthetic training images (10% held out for validation).")
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-tfkd"))
    args = parser.parse_args()
    started = time.perf_counter()

    teachers = {
        "self": train("teach", "standard", STUDENT, args.out / "teacher-self", args, seed=TEACHER_SEED),
        "larger": train("teach", "standard", LARGER_TEACHER, args.out / "teacher-larger", args, seed=TEACHER_SEED),
    }
    for name, summary in teachers.items():
        print(f"teacher {name}: {summary.config.model.name} test top-1 {summary.test['top1']:.4f} ECE {summary.test['ece']:.4f}", flush=True)

    runs = {
        "baseline (standard)": ("standard", None),
        "tfkd-self": ("tfkd-self", teachers["self"].run_dir / "last.safetensors"),
        "tfkd-virtual": ("tfkd-virtual", None),
        f"kd from {LARGER_TEACHER}": ("kd", teachers["larger"].run_dir / "last.safetensors"),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for label, (method, teacher) in runs.items():
        for seed in args.seeds:
            summary = train("distill", method, STUDENT, args.out / f"{method}-seed{seed}", args, seed=seed, teacher=teacher)
            results.setdefault(label, []).append({"seed": seed, "top1": summary.test["top1"], "ece": summary.test["ece"]})
            print(f"{label} seed {seed}: top-1 {summary.test['top1']:.4f} ECE {summary.test['ece']:.4f}", flush=True)

    print(f"\n{STUDENT} students, {args.epochs} epochs, {args.num_train} synthetic train images, seeds {args.seeds}")
    print(f"{'method':<28}{'test top-1':>20}{'ECE':>20}")
    for label, rows in results.items():
        print(f"{label:<28}{mean_std([r['top1'] for r in rows]):>20}{mean_std([r['ece'] for r in rows]):>20}")
    elapsed = time.perf_counter() - started
    print(f"({elapsed / 60:.1f} min)")
    report = {
        "epochs": args.epochs,
        "num_train": args.num_train,
        "seeds": args.seeds,
        "teachers": {name: {"model": s.config.model.name, **s.test} for name, s in teachers.items()},
        "students": results,
        "minutes": round(elapsed / 60, 1),
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
