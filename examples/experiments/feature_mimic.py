"""Hong et al. (CVPR 2021), clean-teacher features for a noisy-input student: the three factors as contrasts.

One clean cifar_resnet20 teacher is trained on a larger training set than the
students get (so that it knows more than they can learn; Hong et al.'s second
factor), keeping a checkpoint per epoch; then, for each noise level σ and seed, cifar_resnet8 students see noisy inputs
under the same budget and schedule. Every arm is a ``feature-mimic`` run:

* ``baseline``: λ = 0 (cross-entropy on noisy inputs only);
* ``kd``: λ = 0 plus Hinton KD to the clean teacher's logits (0.1 CE / 0.9 KD, τ = 4);
* ``mimic``: CE + λ · MSE to the teacher's clean features of stages 1, 2, 3;
* factor 2, a weak teacher: ``mimic, weak teacher`` and ``kd, weak teacher`` use
  the teacher's first-epoch checkpoint instead of its best one;
* factor 3, which layers: ``mimic, early layer`` (stage 1 only) and ``mimic, late layer`` (stage 3 only).

Factor 1, early stopping vs training to zero loss, is read off every run: the
training set is small and the schedule long, so the students approach zero
training loss; each run is evaluated at its best noisy-validation epoch
(early stopping) and at its last epoch (trained to the end), on the test
split with the same seeded noise (``kdcli eval --noise-std σ``).

    make experiment-feature-mimic
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kit import bar_chart, markdown_table, mean_std, run, write_results

from kdcli.config import build_config
from kdcli.jobs.common import load_data
from kdcli.jobs.evaluate import evaluate_checkpoint

WEAK = "weak"  # marks the arms distilled from the teacher's first-epoch checkpoint
ARMS: dict[str, list[str]] = {
    "baseline": ["method.feature_weight=0"],
    "kd": ["method.feature_weight=0", "method.kd_weight=0.9", "method.ce_weight=0.1"],
    "mimic": [],
    "mimic, weak teacher": [WEAK],
    "kd, weak teacher": [WEAK, "method.feature_weight=0", "method.kd_weight=0.9", "method.ce_weight=0.1"],
    "mimic, early layer": ["method.layers=[1]"],
    "mimic, late layer": ["method.layers=[3]"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/feature-mimic"))
    parser.add_argument("--figure", type=Path, help="Where to save the bar chart (default OUT/feature_mimic.png).")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", type=int, default=25)
    parser.add_argument("--num-train", type=int, default=2_000, help="the students' synthetic training images (val is 10%% of them)")
    parser.add_argument("--teacher-num-train", type=int, default=10_000, help="the teacher's synthetic training images")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM")
    return parser.parse_args()


def noisy_test_top1(checkpoint: Path, sigma: float) -> float:
    return evaluate_checkpoint(checkpoint, noise_std=sigma, noise_seed=0)["metrics"]["top1"]


def student(args: argparse.Namespace, arm: str, sigma: float, seed: int, teachers: dict[str, Path]) -> dict[str, Any]:
    settings = [item for item in ARMS[arm] if item != WEAK]
    teacher = teachers["weak" if WEAK in ARMS[arm] else "strong"]
    out = args.out / f"sigma{sigma}" / arm.replace(" ", "_").replace(",", "") / f"seed{seed}"
    summary = run(out, {"job": "distill"}, [
        f"data.synthetic.num_train={args.num_train}", "train.keep_best=true", "method.name=feature-mimic",
        f"method.noise_std={sigma}", "model.name=cifar_resnet8", f"teacher={teacher}", f"train.epochs={args.student_epochs}",
        f"train.seed={seed}", "train.save_every=1000", *settings,
    ])
    final = summary["final_epoch"]
    return {
        "sigma": sigma, "seed": seed, "arm": arm, "best_epoch": summary["best_epoch"],
        "early_stopped": noisy_test_top1(out / "best.safetensors", sigma), "last_epoch": noisy_test_top1(out / "last.safetensors", sigma),
        "final_train_ce": final["loss"]["ce"] / _ce_weight(settings), "final_train_top1": final["train_top1"],
    }


def _ce_weight(settings: list[str]) -> float:
    weights = [float(item.split("=")[1]) for item in settings if item.startswith("method.ce_weight=")]
    return weights[0] if weights else 1.0


def main() -> None:
    args = parse_args()
    teacher_run = args.out / "teacher"
    run(teacher_run, {"job": "teach"}, [
        f"data.synthetic.num_train={args.teacher_num_train}", "train.keep_best=true", "model.name=cifar_resnet20",
        f"train.epochs={args.teacher_epochs}"])
    teachers = {"strong": teacher_run / "best.safetensors", "weak": teacher_run / "checkpoints" / "epoch_0001.safetensors"}
    students_data = load_data(build_config(overrides=[f"data.synthetic.num_train={args.num_train}"]).data)
    clean = {name: evaluate_checkpoint(path, bundle=students_data)["metrics"]["top1"] for name, path in teachers.items()}
    print(f"teacher clean test top-1: strong (best val epoch) {clean['strong']:.4f}, weak (epoch 1) {clean['weak']:.4f}", flush=True)
    runs = [student(args, arm, sigma, seed, teachers) for sigma in args.sigmas for arm in args.arms for seed in args.seeds]
    report(args, clean, runs)


def report(args: argparse.Namespace, clean: dict[str, float], runs: list[dict[str, Any]]) -> None:
    rows = []
    for sigma in args.sigmas:
        for arm in args.arms:
            mine = [r for r in runs if r["sigma"] == sigma and r["arm"] == arm]
            rows.append([f"{sigma}", arm, mean_std([r["early_stopped"] for r in mine], 3), mean_std([r["last_epoch"] for r in mine], 3),
                         mean_std([r["final_train_ce"] for r in mine], 3)])
    heading = (f"teacher cifar_resnet20 ({args.teacher_num_train} training images) clean test top-1 on the students' test split: strong {clean['strong']:.4f}, weak (epoch 1) {clean['weak']:.4f}; "
               f"cifar_resnet8 students, {args.num_train} synthetic training images, {args.student_epochs} epochs, seeds {args.seeds}; "
               "noisy-test top-1 (same σ on test)")
    table = markdown_table(["σ", "arm", "best noisy-val epoch", "last epoch", "final training CE"], rows)
    write_results(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "teacher_clean_test_top1": clean, "runs": runs},
                  heading + "\n\n" + table)
    groups = {f"σ = {sigma}": {arm: [r["early_stopped"] for r in runs if r["sigma"] == sigma and r["arm"] == arm] for arm in args.arms}
              for sigma in args.sigmas}
    bar_chart(args.figure or args.out / "feature_mimic.png", groups, ylabel="noisy test top-1 (best noisy-val epoch)",
              title="feature-mimic: clean-teacher features for noisy-input students")


if __name__ == "__main__":
    main()
