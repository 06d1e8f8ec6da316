"""Why does TGeo-KD's learned ratio trail a fixed one? One cause at a time (``make experiment-fusion``).

On the synthetic data set with a fraction of the *training* labels flipped
(``data.synthetic.label_flip``; test labels untouched), a cifar_resnet20 teacher
is trained on the noisy labels and kept at its best validation epoch, then
cifar_resnet8 students are distilled from it with ``adaptive-fusion``. The
reference arms are the fixed ratio (0.9) and the paper's cheap baselines (ADA,
WLS); the learned arms each change ONE thing from kdcli's default learned ratio:

* ``clean meta set``: the upper level's validation split keeps its true labels
  (``data.synthetic.label_flip_val=false``), as meta-learned weighting assumes;
* ``init α 0.5``: the fusion MLP starts at α = 0.5 instead of at the fixed ratio;
* ``meta lr 1e-2`` / ``meta lr 1e-4``: the fusion network's learning rate;
* ``meta every 4``: the fusion network is updated every 4th step.

Reported per arm: student test top-1 of the last epoch (mean ± std over
seeds) and the last epoch's mean α on training samples whose label was
flipped vs kept. Test labels are used once, for the table; nothing is selected on them.

    python examples/experiments/adaptive_fusion.py --out runs/experiment-fusion
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from kit import bar_chart, markdown_table, mean_std, run, write_results

from kdcli.checkpoint import load_state
from kdcli.config import build_config
from kdcli.jobs.common import evaluation_split, load_data

ARMS: dict[str, list[str]] = {
    "fixed 0.9": ["method.ratio=fixed"],
    "ada": ["method.ratio=ada"],
    "wls": ["method.ratio=wls"],
    "learned (default)": ["method.ratio=learned"],
    "learned, clean meta set": ["method.ratio=learned", "data.synthetic.label_flip_val=false"],
    "learned, init α 0.5": ["method.ratio=learned", "method.alpha=0.5"],
    "learned, meta lr 1e-2": ["method.ratio=learned", "method.meta_lr=1e-2"],
    "learned, meta lr 1e-4": ["method.ratio=learned", "method.meta_lr=1e-4"],
    "learned, meta every 4": ["method.ratio=learned", "method.meta_every=4"],
}
DEFAULT_ARMS = ("fixed 0.9", "learned (default)", "learned, clean meta set", "learned, init α 0.5", "learned, meta lr 1e-2", "learned, meta every 4")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-fusion"))
    parser.add_argument("--figure", type=Path, help="Where to save the bar chart (default OUT/fusion.png).")
    parser.add_argument("--label-flip", type=float, default=0.3, help="Fraction of training labels flipped.")
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--student-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS), metavar="ARM")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra --set KEY=VALUE for the students.")
    return parser.parse_args()


def flipped_in_training_split(data: list[str]) -> torch.Tensor:
    """bool per sample of the training split (after the validation split is carved out): was its label flipped?"""
    noisy_config = build_config(overrides=data).data
    clean_config = build_config(overrides=[*data, "data.synthetic.label_flip=0"]).data
    noisy, clean = (evaluation_split(load_data(config), config, "train") for config in (noisy_config, clean_config))
    return noisy.targets != clean.targets


def alpha_on(run_dir: Path, flipped: torch.Tensor) -> dict[str, float]:
    alpha = load_state(run_dir / "resume.safetensors")["method"]["alpha_by_sample"]
    return {"alpha_flipped": alpha[flipped].mean().item(), "alpha_clean": alpha[~flipped].mean().item()}


def main() -> None:
    args = parse_arguments()
    data = [f"data.synthetic.label_flip={args.label_flip}", f"data.synthetic.num_train={args.num_train}"]
    teacher = run(args.out / "teacher", {"job": "teach"}, [
        *data, "model.name=cifar_resnet20", f"train.epochs={args.teacher_epochs}", "train.keep_best=true"])
    flipped = flipped_in_training_split(data)
    students: dict[str, list[dict[str, Any]]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            run_dir = args.out / arm.replace(" ", "_").replace(",", "") / f"seed{seed}"
            overrides = [
                *data, "method.name=adaptive-fusion", "model.name=cifar_resnet8", f"teacher={args.out / 'teacher' / 'best.safetensors'}",
                f"train.epochs={args.student_epochs}", f"train.seed={seed}", *ARMS[arm], *args.overrides,
            ]
            summary = run(run_dir, {"job": "distill"}, overrides)
            students.setdefault(arm, []).append({"seed": seed, "test_top1": summary["test"]["top1"]} | alpha_on(run_dir, flipped))
    report(args, teacher, students)


def report(args: argparse.Namespace, teacher: dict[str, Any], students: dict[str, list[dict[str, Any]]]) -> None:
    rows = [[arm, *(mean_std([run[key] for run in runs], 3) for key in ("test_top1", "alpha_flipped", "alpha_clean"))]
            for arm, runs in students.items()]
    table = markdown_table(["ratio", "student test top-1", "α on flipped labels", "α on clean labels"], rows)
    heading = (f"teacher cifar_resnet20 (best val epoch) test top-1 {teacher['test']['top1']:.4f}; {args.label_flip:.0%} of "
               f"{args.num_train} training labels flipped; cifar_resnet8 students, {args.student_epochs} epochs, seeds {args.seeds}")
    write_results(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "teacher_test": teacher["test"], "students": students},
                  heading + "\n\n" + table)
    groups = {"student test top-1": {arm: [run["test_top1"] for run in runs] for arm, runs in students.items()}}
    bar_chart(args.figure or args.out / "fusion.png", groups, ylabel="test top-1",
              title=f"adaptive-fusion, {args.label_flip:.0%} flipped labels: learned-ratio causes, one at a time")


if __name__ == "__main__":
    main()
