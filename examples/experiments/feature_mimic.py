"""Feature mimicking from clean to noisy inputs (Hong et al., CVPR 2021) on the synthetic data set.

One clean teacher, then for each noise level σ and seed three students under
the same budget (epochs, schedule, noisy-val model selection):

* ``feature-mimic``: CE on noisy inputs + λ · MSE to the clean teacher's stage features;
* ``baseline``: the same run with λ = 0 (CE on noisy inputs only);
* ``kd``: λ = 0 plus Hinton KD to the clean teacher's logits (0.1 CE / 0.9 KD, τ = 4).

Each student's best noisy-val checkpoint is evaluated on the test split with
the same seeded noise (``kdcli eval --noise-std σ``).  Prints a markdown table
of mean ± std noisy-test top-1 over seeds.  Run with ``make experiment-feature-mimic``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from kdcli.config import build_config
from kdcli.jobs.evaluate import evaluate_checkpoint
from kdcli.jobs.train import run_training

ARMS: dict[str, list[str]] = {
    "feature-mimic": [],
    "baseline": ["method.feature_weight=0"],
    "kd": ["method.feature_weight=0", "method.kd_weight=0.9", "method.ce_weight=0.1"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/feature-mimic"))
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-model", default="cifar_resnet20")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-model", default="cifar_resnet8")
    parser.add_argument("--student-epochs", type=int, default=12)
    parser.add_argument("--feature-weight", type=float, default=1.0, help="lambda of the feature-mimic arm")
    parser.add_argument("--layers", default="[1,2,3]")
    parser.add_argument("--num-train", type=int, default=10_000, help="synthetic training images (val is 10%% of them)")
    return parser.parse_args()


def train(job: str, out: Path, overrides: list[str], **flags: Any) -> Path:
    """One run through the same job the CLI uses; returns the checkpoint selected on (noisy) val."""
    config = build_config(defaults={"method": {"name": "standard"}}, flags={"job": job, **flags}, overrides=overrides)
    run_training(config, out, overwrite=True, show_progress=False)
    return out / "best.safetensors"


def main() -> None:
    args = parse_args()
    data = [f"data.synthetic.num_train={args.num_train}", "train.keep_best=true"]
    started = time.perf_counter()
    teacher = train("teach", args.out / "teacher", data, model={"name": args.teacher_model}, train={"epochs": args.teacher_epochs})
    teacher_clean = evaluate_checkpoint(teacher)["metrics"]["top1"]
    print(f"teacher {args.teacher_model}: clean test top-1 {teacher_clean:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)

    results: list[dict[str, Any]] = []
    for sigma in args.sigmas:
        for seed in args.seeds:
            for arm, arm_overrides in ARMS.items():
                run_started = time.perf_counter()
                overrides = [
                    *data, "method.name=feature-mimic", f"method.noise_std={sigma}", f"method.layers={args.layers}",
                    f"method.feature_weight={args.feature_weight}", *arm_overrides,
                ]
                best = train(
                    "distill", args.out / f"sigma{sigma}" / f"{arm}-seed{seed}", overrides, teacher=str(teacher),
                    model={"name": args.student_model}, train={"epochs": args.student_epochs, "seed": seed},
                )
                noisy = evaluate_checkpoint(best, noise_std=sigma, noise_seed=0)["metrics"]["top1"]
                clean = evaluate_checkpoint(best)["metrics"]["top1"]
                record = {"sigma": sigma, "seed": seed, "arm": arm, "noisy_test_top1": noisy, "clean_test_top1": clean,
                          "seconds": round(time.perf_counter() - run_started, 1)}
                results.append(record)
                print(json.dumps(record), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "teacher_clean_test_top1": teacher_clean, "runs": results}, indent=1))
    print_table(results, args)
    print(f"total {time.perf_counter() - started:.0f}s")


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nnoisy-test top-1, mean ± std over seeds {args.seeds} ({args.student_model} student, {args.student_epochs} epochs, best noisy-val epoch)")
    print("| σ | " + " | ".join(ARMS) + " |")
    print("|---|" + "---|" * len(ARMS))
    for sigma in args.sigmas:
        cells = []
        for arm in ARMS:
            values = [r["noisy_test_top1"] for r in results if r["sigma"] == sigma and r["arm"] == arm]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"| {sigma} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
