"""Teacher-free KD on the synthetic data set: baseline vs tfkd-self vs tfkd-virtual vs KD from a larger teacher.

Every student is a ``cifar_resnet8`` trained for the same number of epochs with
the same optimizer and schedule (kdcli's defaults); only the method differs.
The tfkd-self teacher is a ``standard`` cifar_resnet8 and the KD teacher a
``standard`` cifar_resnet20, each trained once (seed 100) for the same epochs.
tfkd-* run with the official CIFAR-100 MobileNetV2 settings, kd with RepDistiller's (τ 4, 0.1 / 0.9).

With 10 classes those tfkd-virtual settings (τ = 40) make the virtual teacher
nearly uniform, so a 10-class setting is searched: a grid over τ and α is
trained with seed 0 and ranked by *validation* top-1 of the last epoch; the
winner is then trained with every seed and reported on test beside the others.

    make experiment-tfkd                  # or: python examples/experiments/tfkd.py --epochs 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from kit import bar_chart, markdown_table, mean_std, run, write_results

STUDENT = "cifar_resnet8"
LARGER_TEACHER = "cifar_resnet20"
TEACHER_SEED = 100
SEARCH_TEMPERATURES = (0.2, 1.0, 40.0)
SEARCH_ALPHAS = (0.5, 0.95)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="Epochs of every run, teachers included.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student training seeds.")
    parser.add_argument("--num-train", type=int, default=10_000, help="Synthetic training images (10%% held out for validation).")
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-tfkd"))
    parser.add_argument("--figure", type=Path, help="Where to save the bar chart (default OUT/tfkd.png).")
    return parser.parse_args()


def train(args: argparse.Namespace, out: Path, job: str, method: dict[str, Any], model: str, seed: int, teacher: Path | None = None) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "job": job, "method": method, "model": {"name": model},
        "train": {"epochs": args.epochs, "seed": seed, "save_every": 10_000}, "data": {"synthetic": {"num_train": args.num_train}},
    }
    if teacher is not None:
        tree["teacher"] = str(teacher)
    return run(args.out / out, tree)


def search_virtual(args: argparse.Namespace) -> tuple[dict[str, Any], list[list[str]]]:
    """The grid's (τ, α) with the best validation top-1 (seed 0), and the grid as table rows."""
    scores = {}
    for temperature, alpha in itertools.product(SEARCH_TEMPERATURES, SEARCH_ALPHAS):
        method = {"name": "tfkd-virtual", "temperature": temperature, "alpha": alpha}
        summary = train(args, Path("search") / f"tau{temperature}-alpha{alpha}", "distill", method, STUDENT, args.seeds[0])
        scores[(temperature, alpha)] = summary["final_epoch"]["val_top1"]
    temperature, alpha = max(scores, key=scores.__getitem__)
    rows = [[f"{t:g}", f"{a:g}", f"{score:.4f}"] for (t, a), score in scores.items()]
    return {"name": "tfkd-virtual", "temperature": temperature, "alpha": alpha}, rows


def main() -> None:
    args = parse_args()
    teachers = {
        "self": train(args, Path("teacher-self"), "teach", {"name": "standard"}, STUDENT, TEACHER_SEED),
        "larger": train(args, Path("teacher-larger"), "teach", {"name": "standard"}, LARGER_TEACHER, TEACHER_SEED),
    }
    virtual_10, grid = search_virtual(args)
    arms: dict[str, tuple[dict[str, Any], Path | None]] = {
        "baseline (standard)": ({"name": "standard"}, None),
        "tfkd-self": ({"name": "tfkd-self"}, Path(teachers["self"]["run_dir"]) / "last.safetensors"),
        "tfkd-virtual (CIFAR-100 defaults)": ({"name": "tfkd-virtual"}, None),
        f"tfkd-virtual (τ {virtual_10['temperature']:g}, α {virtual_10['alpha']:g}, found on val)": (virtual_10, None),
        f"kd from {LARGER_TEACHER}": ({"name": "kd"}, Path(teachers["larger"]["run_dir"]) / "last.safetensors"),
    }
    results: dict[str, list[dict[str, float]]] = {}
    for index, (label, (method, teacher)) in enumerate(arms.items()):
        for seed in args.seeds:
            summary = train(args, Path(f"arm{index}") / f"seed{seed}", "distill", method, STUDENT, seed, teacher)
            results.setdefault(label, []).append({"seed": seed, "top1": summary["test"]["top1"], "ece": summary["test"]["ece"]})
    report(args, teachers, grid, results)


def report(args: argparse.Namespace, teachers: dict[str, Any], grid: list[list[str]], results: dict[str, list[dict[str, float]]]) -> None:
    teacher_line = ", ".join(f"{name} {summary['model']} {summary['test']['top1']:.4f}" for name, summary in teachers.items())
    heading = f"{STUDENT} students, {args.epochs} epochs, {args.num_train} synthetic training images, seeds {args.seeds}; teachers: {teacher_line}"
    rows = [[label, mean_std([r["top1"] for r in runs], 4), mean_std([r["ece"] for r in runs], 4)] for label, runs in results.items()]
    table = markdown_table(["student", "test top-1", "ECE"], rows)
    search = markdown_table(["τ", "α", "val top-1 (seed 0, last epoch)"], grid)
    write_results(args.out, {"settings": {k: str(v) for k, v in vars(args).items()}, "teachers": teachers, "search": grid, "students": results},
                  f"{heading}\n\n{table}\n\ntfkd-virtual search on validation:\n\n{search}")
    groups = {"test top-1": {label: [r["top1"] for r in runs] for label, runs in results.items()}}
    bar_chart(args.figure or args.out / "tfkd.png", groups, ylabel="test top-1", title="Teacher-free KD, 10 synthetic classes")


if __name__ == "__main__":
    main()
