"""Standard vs SoTeacher teachers on the synthetic data set, then a KD student from each.

SoTeacher's claim (Dong, Liu, Shang, ICLR 2024): a teacher trained with the
Lipschitz and consistency regularizers approximates the true label
distribution p* better on its training inputs and so teaches a better student,
even when its own test accuracy is not higher. The synthetic data set knows
p*, so all three quantities are measured here:

* teacher test top-1 (and training top-1: has it memorized the noisy labels?); the
  standard teacher also as its best validation epoch, the usual way to pick a teacher,
* teacher distance to p* on the training inputs (total variation),
* student test top-1 after Hinton KD from that teacher (the same recipe for all).

The default arms sweep λ_LR at a fixed schedule; ``--teacher-epochs`` changes the
schedule, ``--variant NAME=KEY=VALUE,...`` adds SoTeacher settings. Finished runs
under ``--out`` with the same config are reused.

    make experiment-soteacher
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kit import bar_chart, markdown_table, mean_std, run, write_results

from kdcli.config import parse_override
from kdcli.jobs.evaluate import evaluate_checkpoint

BASE_VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {"name": "standard"},
    "standard, best val epoch": {"name": "standard"},
    "soteacher λ_LR 1e-5 (paper)": {"name": "soteacher"},
    "soteacher λ_LR 1e-3": {"name": "soteacher", "lipschitz_weight": 1e-3},
    "soteacher λ_LR 3e-3": {"name": "soteacher", "lipschitz_weight": 3e-3},
}
EARLY_STOPPED = {"standard, best val epoch"}  # the teacher is its best validation epoch, not its last
STUDENT_METHOD = {"name": "kd", "temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}  # SoTeacher's student script
COLUMNS = {
    "teacher_top1": "teacher test top-1", "teacher_train_top1": "teacher train top-1",
    "teacher_pstar_tv_train": "teacher TV to p* (train)", "student_top1": "KD student test top-1",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds per variant")
    parser.add_argument("--num-train", type=int, default=5_000, help="synthetic training-set size")
    parser.add_argument("--teacher-model", default="cifar_resnet20")
    parser.add_argument("--student-model", default="cifar_resnet8")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", type=int, default=15)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="an extra SoTeacher variant, e.g. strong_lip=lipschitz_weight=8e-4")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/soteacher_vs_standard"))
    parser.add_argument("--figure", type=Path, help="Where to save the bar chart (default OUT/soteacher.png).")
    return parser.parse_args()


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=KEY=VALUE,KEY=VALUE``: a SoTeacher variant with these hyperparameters."""
    name, _, assignments = text.partition("=")
    method: dict[str, Any] = {"name": "soteacher"}
    for assignment in filter(None, assignments.split(",")):
        (key,), value = parse_override(assignment)
        method[key] = value
    return name, method


def measure(variant: str, method: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, float]:
    root = args.out / f"teacher{args.teacher_epochs}ep" / variant.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") / f"seed{seed}"
    common = {"data": {"synthetic": {"num_train": args.num_train}}, "train": {"seed": seed, "save_every": 10_000}}
    teacher_tree = common | {"job": "teach", "method": method, "model": {"name": args.teacher_model}}
    early_stopped = variant in EARLY_STOPPED
    run(root / "teacher", teacher_tree, [f"train.epochs={args.teacher_epochs}", f"train.keep_best={str(early_stopped).lower()}"])
    teacher = root / "teacher" / ("best.safetensors" if early_stopped else "last.safetensors")
    student_tree = common | {"job": "distill", "method": STUDENT_METHOD, "model": {"name": args.student_model}, "teacher": str(teacher)}
    student = run(root / "student", student_tree, [f"train.epochs={args.student_epochs}"])
    teacher_test = evaluate_checkpoint(teacher)["metrics"]
    return {
        "teacher_top1": teacher_test["top1"],
        "teacher_train_top1": evaluate_checkpoint(teacher, split="train")["metrics"]["top1"],
        "teacher_pstar_tv_train": teacher_test["pstar_tv_train"],
        "student_top1": student["test"]["top1"],
    }


def main() -> None:
    args = parse_args()
    variants = dict(BASE_VARIANTS) | dict(parse_variant(text) for text in args.variant)
    if args.only:
        variants = {name: variants[name] for name in args.only}
    results = {name: [measure(name, method, seed, args) for seed in args.seeds] for name, method in variants.items()}
    rows = [[name, *(mean_std([row[key] for row in rows], 3) for key in COLUMNS)] for name, rows in results.items()]
    heading = (f"{args.num_train} synthetic training inputs (10% held out); teacher {args.teacher_model} × {args.teacher_epochs} "
               f"epochs, student {args.student_model} × {args.student_epochs} epochs (KD τ 4, CE/KD 0.5/0.5); seeds {args.seeds}")
    write_results(args.out / f"teacher{args.teacher_epochs}ep",
                  {"args": {k: str(v) for k, v in vars(args).items()}, "variants": variants, "results": results},
                  heading + "\n\n" + markdown_table(["teacher", *COLUMNS.values()], rows))
    groups = {label: {name: [row[key] for row in rows] for name, rows in results.items()}
              for key, label in COLUMNS.items() if key in ("teacher_top1", "student_top1")}
    bar_chart(args.figure or args.out / f"teacher{args.teacher_epochs}ep" / "soteacher.png", groups, ylabel="test top-1",
              title=f"SoTeacher vs standard teachers ({args.teacher_epochs} teacher epochs) and their KD students")


if __name__ == "__main__":
    main()
