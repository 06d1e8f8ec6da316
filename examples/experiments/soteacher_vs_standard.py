"""Standard vs SoTeacher teachers on the synthetic data set, then a KD student from each.

SoTeacher's claim (Dong, Liu, Shang, ICLR 2024): a teacher trained with the
Lipschitz and consistency regularizers approximates the true label
distribution p* better on its training inputs and so teaches a better student,
even when its own test accuracy is not higher.  The synthetic data set knows
p*, so all three quantities are measured here:

* teacher test top-1,
* teacher distance to p* on the training inputs (total variation and squared l2),
* student test top-1 after Hinton KD from that teacher (the same recipe for all).

Every teacher variant is trained with the same budget over the same seeds;
finished runs under ``--out`` with the same config are reused, so variants can
be added later (``--variant lip_scaled=lipschitz_weight=1e-3 --only lip_scaled``).
Run with ``make experiment-soteacher`` (about 17 CPU-minutes with the defaults,
10-15 minutes on two idle cores) or ``python examples/experiments/soteacher_vs_standard.py --help``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from kdcli.config import build_config, load_resolved_config, parse_override
from kdcli.jobs.common import load_data
from kdcli.jobs.evaluate import evaluate_checkpoint
from kdcli.jobs.build import resolve_run
from kdcli.jobs.train import run_training

# The variants compared; "--variant NAME=KEY=VALUE,..." adds more SoTeacher settings.
BASE_VARIANTS: dict[str, dict[str, Any]] = {
    "standard": {"name": "standard"},
    "soteacher": {"name": "soteacher"},
}
STUDENT_METHOD = {"name": "kd", "temperature": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}  # SoTeacher's student script


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant")
    parser.add_argument("--num-train", type=int, default=10_000, help="synthetic training-set size")
    parser.add_argument("--teacher-model", default="cifar_resnet20")
    parser.add_argument("--student-model", default="cifar_resnet8")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", type=int, default=15)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="an extra SoTeacher variant, e.g. strong_lip=lipschitz_weight=8e-4")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/soteacher_vs_standard"))
    return parser.parse_args()


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=KEY=VALUE,KEY=VALUE``: a SoTeacher variant with these hyperparameters."""
    name, _, assignments = text.partition("=")
    method: dict[str, Any] = {"name": "soteacher"}
    for assignment in filter(None, assignments.split(",")):
        (key,), value = parse_override(assignment)
        method[key] = value
    return name, method


def common_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "data": {"synthetic": {"num_train": args.num_train}},
        "train": {"seed": seed, "save_every": 10_000},
    }


def train(job: str, method: dict[str, Any], model: str, epochs: int, seed: int, out: Path, args: argparse.Namespace, bundle: Any, teacher: Path | None = None) -> Path:
    """One run, returning its last checkpoint; a finished run with the same config is reused."""
    tree = common_config(args, seed) | {"job": job, "method": method, "model": {"name": model}}
    tree["train"]["epochs"] = epochs
    if teacher is not None:
        tree["teacher"] = str(teacher)
    config = resolve_run(build_config(defaults=tree)).config
    finished = out / "finished"
    if not (finished.is_file() and load_resolved_config(out / "config.json") == config):
        run_training(config, out, overwrite=True, show_progress=False, bundle=bundle)
        finished.touch()
    return out / "last.safetensors"


def measure(variant: str, method: dict[str, Any], seed: int, args: argparse.Namespace, bundle: Any) -> dict[str, float]:
    root = args.out / variant / f"seed{seed}"
    teacher = train("teach", method, args.teacher_model, args.teacher_epochs, seed, root / "teacher", args, bundle)
    teacher_metrics = evaluate_checkpoint(teacher, bundle=bundle)["metrics"]
    student = train("distill", STUDENT_METHOD, args.student_model, args.student_epochs, seed, root / "student", args, bundle, teacher)
    student_metrics = evaluate_checkpoint(student, bundle=bundle)["metrics"]
    teacher_train = evaluate_checkpoint(teacher, split="train", bundle=bundle)["metrics"]
    return {
        "teacher_top1": teacher_metrics["top1"],
        "teacher_train_top1": teacher_train["top1"],
        "teacher_pstar_tv_train": teacher_metrics["pstar_tv_train"],
        "teacher_pstar_sq_l2_train": teacher_metrics["pstar_sq_l2_train"],
        "student_top1": student_metrics["top1"],
        "student_pstar_tv_train": student_metrics["pstar_tv_train"],
    }


def summarize(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    args = parse_args()
    variants = dict(BASE_VARIANTS) | dict(parse_variant(text) for text in args.variant)
    if args.only:
        variants = {name: variants[name] for name in args.only}
    bundle = load_data(build_config(defaults=common_config(args, 0)).data)
    print(
        f"synthetic data: {args.num_train} train inputs (10% held out for validation), {len(bundle.test)} test; "
        f"teacher {args.teacher_model} x {args.teacher_epochs} epochs, student {args.student_model} x "
        f"{args.student_epochs} epochs (KD tau 4, CE/KD 0.5/0.5); seeds 0..{args.seeds - 1}",
        flush=True,
    )
    started = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {}
    for name, method in variants.items():
        for seed in range(args.seeds):
            row = measure(name, method, seed, args, bundle)
            results.setdefault(name, []).append(row)
            print(f"  {name} seed {seed}: " + ", ".join(f"{key} {value:.4f}" for key, value in row.items()), flush=True)
    columns = ("teacher_top1", "teacher_train_top1", "teacher_pstar_tv_train", "teacher_pstar_sq_l2_train", "student_top1")
    print(f"\nmean ± std over {args.seeds} seeds ({time.perf_counter() - started:.0f} s)")
    print(f"{'variant':<14}" + "".join(f"{column:>28}" for column in columns))
    for name, rows in results.items():
        print(f"{name:<14}" + "".join(f"{summarize([row[column] for row in rows]):>28}" for column in columns))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "variants": variants, "results": results}, indent=2))
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
