"""Learned vs fixed vs ADA vs WLS fusion ratios under label noise (``make experiment-fusion``).

On the synthetic data set with a fraction of the *training* labels flipped
(``data.synthetic.label_flip``; test labels untouched), a cifar_resnet20 teacher
is trained on the noisy labels and kept at its best validation epoch (its last
epochs memorize the flipped labels), then cifar_resnet8 students are distilled
from it with ``adaptive-fusion`` and each ``ratio`` over several seeds. Reported per
variant: student test top-1 (mean ± std over seeds) and the last epoch's mean
alpha on training samples whose label was flipped vs kept.

    python examples/experiments/adaptive_fusion.py --out runs/experiment-fusion
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kdcli.checkpoint import load_state
from kdcli.config import RunConfig, build_config
from kdcli.data.bundle import split_train_val
from kdcli.data.synthetic import make_synthetic
from kdcli.jobs.train import run_training

RATIOS = ("learned", "fixed", "ada", "wls")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-fusion"))
    parser.add_argument("--label-flip", type=float, default=0.3, help="Fraction of training labels flipped.")
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra --set KEY=VALUE for the students.")
    return parser.parse_args()


def data_overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.synthetic.label_flip={args.label_flip}", f"data.synthetic.num_train={args.num_train}"]


def train(job: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    config = build_config(defaults={"job": job}, overrides=overrides)
    started = time.perf_counter()
    summary = run_training(config, out, overwrite=True, show_progress=False)
    print(f"  {out.name}: test top-1 {summary.test['top1']:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
    return {"test_top1": summary.test["top1"], "method": summary.history[-1].get("method", {})}


def flipped_in_training_split(config: RunConfig) -> torch.Tensor:
    """bool per sample of the training split (after the validation split is carved out): was its label flipped?"""
    settings = config.data.synthetic.model_dump()
    noisy = make_synthetic(**settings).train
    clean = make_synthetic(**{**settings, "label_flip": 0.0}).train
    (noisy_train, _), (clean_train, _) = (split_train_val(split, config.data.val_split, config.data.split_seed) for split in (noisy, clean))
    return noisy_train.targets != clean_train.targets


def alpha_on(run_dir: Path, flipped: torch.Tensor) -> dict[str, float]:
    alpha = load_state(run_dir / "resume.safetensors")["method"]["alpha_by_sample"]
    return {"alpha_flipped": alpha[flipped].mean().item(), "alpha_clean": alpha[~flipped].mean().item()}


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    args = parse_arguments()
    data = data_overrides(args)
    print(f"teacher: cifar_resnet20, {args.teacher_epochs} epochs, {args.label_flip:.0%} of training labels flipped", flush=True)
    teacher_overrides = [*data, "model.name=cifar_resnet20", f"train.epochs={args.teacher_epochs}", "train.keep_best=true"]
    teacher = train("teach", args.out / "teacher", teacher_overrides)
    flipped = flipped_in_training_split(build_config(overrides=data))
    results: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}, "teacher_test_top1": teacher["test_top1"], "students": {}}
    for ratio in RATIOS:
        print(f"students: adaptive-fusion ratio={ratio}", flush=True)
        runs = []
        for seed in args.seeds:
            run_dir = args.out / f"{ratio}-seed{seed}"
            overrides = [
                *data, "method.name=adaptive-fusion", f"method.ratio={ratio}", "model.name=cifar_resnet8",
                f"teacher={args.out / 'teacher' / 'best.safetensors'}", f"train.epochs={args.student_epochs}",
                f"train.seed={seed}", *args.overrides,
            ]
            runs.append(train("distill", run_dir, overrides) | alpha_on(run_dir, flipped))
        results["students"][ratio] = runs
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    print(f"\nteacher test top-1 {results['teacher_test_top1']:.4f}")
    print("| ratio | student test top-1 (mean ± std) | alpha on flipped | alpha on clean |")
    print("| --- | --- | --- | --- |")
    for ratio, runs in results["students"].items():
        columns = [mean_std([run[key] for run in runs]) for key in ("test_top1", "alpha_flipped", "alpha_clean")]
        print(f"| {ratio} | " + " | ".join(columns) + " |")


if __name__ == "__main__":
    main()
