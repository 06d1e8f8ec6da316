"""The ``kdcli`` command line: parse, build the config, call a job, print the result.

No training logic lives here.  Jobs (and so torch) are imported inside the
command bodies: ``kdcli --help`` and ``kdcli COMMAND --help`` never load them.  Every ``KdcliError`` becomes one line on stderr
and an exit code (2: wrong invocation, 1: runtime failure, 130: interrupted).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click import exceptions as click_exceptions  # Typer vendors click since 0.29
from typer.core import TyperGroup

from kdcli import __version__
from kdcli.defaults import API_VERSION, DEFAULT_METHODS, EVAL_SPLITS, MAX_SEED
from kdcli.errors import KdcliError, ResumeHint, UsageError, one_line

if TYPE_CHECKING:  # the jobs import torch: command bodies import them, so --help stays fast
    from kdcli.config import RunConfig
    from kdcli.jobs.sweep import SeededSweepResult, SweepResult
    from kdcli.jobs.train import TrainingSummary
    from kdcli.method import Method

MAX_ERROR = 2000  # characters of one error line: a message quoting a huge input must stay readable


class KdcliGroup(TyperGroup):
    """Click's usage errors as one ``kdcli: error:`` line, like every other failure."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning  # a library's warning: one "warning:" line, not its source line
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:
            # Called without arguments: rich has already printed the help; plain click returns it.
            if exc.format_message().strip():
                exc.show()
            result = exc.exit_code
        except click_exceptions.ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "kdcli"
            message = " ".join(exc.format_message().split())
            stderr.print(f"kdcli: error: {message} (see '{command} --help')", markup=False, soft_wrap=True)
            result = exc.exit_code
        except typer.Abort:  # click's name for Ctrl-C while it parses
            result = 130
        if result == 130 and not _interrupt_reported:  # Typer turns Ctrl-C while it parses into a silent exit 130
            os.write(2, b"kdcli: error: interrupted\n")
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=KdcliGroup,
    name="kdcli",
    help="Knowledge distillation from the command line: teach a teacher, distill a student, evaluate, sweep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
methods_app = typer.Typer(help="List the installed methods and describe their hyperparameters.", no_args_is_help=True)
app.add_typer(methods_app, name="methods")

EXPORT_FORMATS = ("timm", "onnx")
stdout = Console()
stderr = Console(stderr=True, highlight=False)
PIPED_WIDTH = 100_000  # wider than any table: nothing is cut or wrapped in a pipe or a file


def print_table(table: Table) -> None:
    """A table on stdout: at the terminal's width, or in a pipe or a file at its own width (rich assumes 80 columns)."""
    (stdout if stdout.is_terminal else Console(width=PIPED_WIDTH, highlight=False)).print(table)


_interrupt_reported = False  # a command already said in its one line that it was interrupted


def _report_interrupt() -> None:
    global _interrupt_reported
    _interrupt_reported = True


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line and an exit code instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KdcliError as exc:
            stderr.print(f"kdcli: error: {one_line(str(exc), MAX_ERROR)}{_resume_words(exc.resume)}", markup=False, soft_wrap=True)
            if exc.exit_code == 130:
                _report_interrupt()
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            stderr.print(f"kdcli: error: {one_line(str(exc), MAX_ERROR)}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            # Training turns its own interrupts into a KdcliError; this one came while setting up or reporting.
            # Written to the descriptor at once: an interrupt inside an import can leave rich's lazy imports unusable.
            os.write(2, b"kdcli: error: interrupted outside training; every file written so far is complete\n")
            _report_interrupt()
            raise typer.Exit(130) from None

    return wrapper


def _resume_words(hint: ResumeHint | None) -> str:
    """How to continue a stopped run, as the command to type."""
    if hint is None:
        return ""
    return f"; {hint.lead}: kdcli {hint.job} --resume {shlex.quote(str(hint.run_dir))}"


def _print_json(value: Any) -> None:
    """Valid JSON on stdout: a non-finite number (NaN, inf) becomes null, and a warning names where."""
    clean, where = _finite(value, "")
    if where:
        _note(f"warning: non-finite values printed as null: {', '.join(where)}")
    stdout.print_json(json.dumps(clean, allow_nan=False))


def _finite(value: Any, path: str) -> tuple[Any, list[str]]:
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "value"]
    if isinstance(value, dict):
        items = [(key, *_finite(item, f"{path}.{key}" if path else str(key))) for key, item in value.items()]
        return {key: item for key, item, _ in items}, [spot for *_, spots in items for spot in spots]
    if isinstance(value, list):
        items = [_finite(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return [item for item, _ in items], [spot for _, spots in items for spot in spots]
    return value, []


def _note(text: str) -> None:
    stderr.print(text, markup=False, soft_wrap=True)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
    _note(f"warning: {category.__name__}: {one_line(str(message), 300)}")


# -- options shared by teach and distill ---------------------------------------------

ModelOption = Annotated[Optional[str], typer.Option("--model", help="timm model name (also the cifar_* zoo).", show_default=False)]
DataOption = Annotated[Optional[str], typer.Option("--data", help="synthetic (default), cifar10, cifar100, or imagefolder:PATH.", show_default=False)]
DataRootOption = Annotated[Optional[Path], typer.Option("--data-root", help="Where downloaded data sets live.", show_default=False)]
DownloadOption = Annotated[bool, typer.Option("--download", help="Download the data set if it is missing.")]
ValSplitOption = Annotated[Optional[float], typer.Option("--val-split", help="Fraction of train held out for validation (0 = none).", show_default=False)]
EpochsOption = Annotated[Optional[int], typer.Option("--epochs", help="Number of epochs.", show_default=False)]
BatchSizeOption = Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size (global).", show_default=False)]
LrOption = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.", show_default=False)]
SaveEveryOption = Annotated[Optional[int], typer.Option("--save-every", help="Keep a checkpoint every K epochs.", show_default=False)]
SeedOption = Annotated[Optional[int], typer.Option("--seed", help="Training seed.", show_default=False)]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda.", show_default=False)]
ConfigOption = Annotated[Optional[Path], typer.Option("--config", help="TOML, YAML or JSON config file.", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key: --set method.temperature=4.", show_default=False)]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/JOB-METHOD-TIME).", show_default=False)]
ResumeOption = Annotated[Optional[Path], typer.Option("--resume", help="Continue the interrupted run in this directory.", show_default=False)]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Check everything, print the fully resolved config and the run plan as JSON, and exit without training or writing.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or per-epoch lines.")]
SeedsOption = Annotated[Optional[str], typer.Option("--seeds", help="Train once per seed into RUN_DIR/seed-N and print mean ± std: 0,1,2 or 0-4 (rerun to continue).", show_default=False)]
LogOption = Annotated[Optional[str], typer.Option("--log", help="Experiment trackers, comma-separated: tensorboard, wandb, mlflow (log.to; each its own extra).", show_default=False)]
EmaOption = Annotated[Optional[float], typer.Option("--ema", metavar="DECAY", help="Keep an EMA of the student with this decay (e.g. 0.999): evaluated each epoch, saved as ema.safetensors (train.ema_decay).", show_default=False)]
AccumulateOption = Annotated[Optional[int], typer.Option("--accumulate", metavar="N", help="Split each step's batch into N micro-batches, one optimizer step per N (train.accumulate_steps).", show_default=False)]
SyncBnOption = Annotated[bool, typer.Option("--sync-bn", help="Under torchrun on CUDA: batch-norm statistics over every process's batch (train.sync_bn).")]
CacheTeacherOption = Annotated[bool, typer.Option("--cache-teacher", help="Compute the teacher's logits once and reuse them across epochs and runs (train.cache_teacher).")]


def _sets(section: str, key: str, default: Any = None) -> Any:
    """A TrainingFlags field whose flag, when given, sets the config key SECTION.KEY."""
    return field(default=default, metadata={"config_key": (section, key)})


def _with_resume(default: Any = None) -> Any:
    """A TrainingFlags field for how a command runs, not what it trains: --resume accepts it."""
    return field(default=default, metadata={"with_resume": True})


@dataclass(frozen=True)
class TrainingFlags:
    """The options teach and distill share (sweep-checkpoints some of them), declared once, in --help order.

    A field's type is its Typer option; its default (None, False) means "not given". ``training_options``
    makes them command parameters and hands the command this object instead.
    """

    model: ModelOption = _sets("model", "name")
    data: DataOption = _sets("data", "name")
    data_root: DataRootOption = _sets("data", "root")
    download: DownloadOption = _sets("data", "download", False)
    val_split: ValSplitOption = _sets("data", "val_split")
    epochs: EpochsOption = _sets("train", "epochs")
    batch_size: BatchSizeOption = _sets("train", "batch_size")
    lr: LrOption = _sets("optim", "lr")
    save_every: SaveEveryOption = _sets("train", "save_every")
    seed: SeedOption = _sets("train", "seed")
    seeds: SeedsOption = None
    device: DeviceOption = _sets("train", "device")
    config: ConfigOption = None
    set: SetOption = None
    out: OutOption = None
    resume: ResumeOption = _with_resume()
    overwrite: OverwriteOption = False
    ema: EmaOption = _sets("train", "ema_decay")
    accumulate: AccumulateOption = _sets("train", "accumulate_steps")
    sync_bn: SyncBnOption = _sets("train", "sync_bn", False)
    cache_teacher: CacheTeacherOption = _sets("train", "cache_teacher", False)
    dry_run: DryRunOption = False
    log: LogOption = _sets("log", "to")
    json_output: JsonOption = _with_resume(False)
    quiet: QuietOption = _with_resume(False)

    def config_tree(self) -> dict[str, Any]:
        """The config keys the given flags set, nested for ``build_config(flags=...)``."""
        tree: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if "config_key" in item.metadata and value is not None and value is not False:
                section, key = item.metadata["config_key"]
                tree.setdefault(section, {})[key] = value
        return tree

    def given_flags(self) -> list[str]:
        """The given flags that --resume refuses, as typed (``--data-root``): options with a value, then switches."""
        # Truthiness, as ever: an empty or zero value (--epochs 0) does not count as given here.
        given = [item for item in fields(self) if not item.metadata.get("with_resume") and getattr(self, item.name)]
        given.sort(key=lambda item: item.default is False)
        return [f"--{item.name.replace('_', '-')}" for item in given]


def training_options(*, without: tuple[str, ...] = ()) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add TrainingFlags' options (less WITHOUT) after a command's own, and call it with them as ``flags``.

    Typer reads a command's options from its signature, so the wrapper gets one: the command's
    parameters but ``flags``, then one keyword parameter per field, typed with the field's option.
    """
    hints = get_type_hints(TrainingFlags, include_extras=True)
    shared = [
        inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=hints[item.name])
        for item in fields(TrainingFlags)
        if item.name not in without
    ]

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = [parameter for parameter in inspect.signature(command, eval_str=True).parameters.values() if parameter.name != "flags"]

        @functools.wraps(command)
        def wrapper(**values: Any) -> None:
            flags = TrainingFlags(**{parameter.name: values.pop(parameter.name) for parameter in shared})
            command(**values, flags=flags)

        signature = inspect.Signature([*own, *shared], return_annotation=None)
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in signature.parameters.values()}
        return wrapper

    return decorate


def _train(job: str, method: str | None, teacher: Path | None, flags: TrainingFlags) -> None:
    show_progress = not flags.quiet
    seeds = parse_seeds(flags.seeds)
    if flags.resume is not None:
        given = flags.given_flags() + ["--method"] * (method is not None) + ["--teacher"] * (teacher is not None)
        if given:
            raise UsageError(f"--resume continues a run with its saved config; drop {', '.join(given)}")
        from kdcli.config import build_config
        from kdcli.jobs.seeds import is_seed_group, saved_group
        from kdcli.jobs.train import run_training

        if is_seed_group(flags.resume):
            saved, saved_seeds = saved_group(flags.resume)
            if saved.job != job:
                raise UsageError(f"{flags.resume} is a {saved.job} seed group; continue it with kdcli {saved.job} --resume {flags.resume}")
            _train_seeds(saved, saved_seeds, flags.resume, flags)
            return
        summary = run_training(build_config(flags={"job": job}), flags.resume, resume=True, show_progress=show_progress, notify=_note)
        _print_summary(summary, as_json=flags.json_output)
        return
    if seeds is not None and flags.seed is not None:
        raise UsageError("give --seed or --seeds, not both")
    tree = flags.config_tree()
    if method is not None:
        tree["method"] = {"name": method}
    if teacher is not None:
        tree["teacher"] = str(teacher)
    _check_config_before_torch(job, flags, tree)
    from kdcli.jobs.build import new_run_config
    from kdcli.jobs.seeds import plan_seeds
    from kdcli.jobs.train import plan_training, run_training

    config = new_run_config(job, file=flags.config, flags=tree, overrides=flags.set or [])
    out = flags.out or _default_out(job, config.method.name)
    if flags.dry_run:
        plan = plan_training(config, out, overwrite=flags.overwrite) if seeds is None else plan_seeds(config, out, seeds, overwrite=flags.overwrite)
        _print_json(plan)
        return
    if seeds is not None:
        _train_seeds(config, seeds, out, flags)
        return
    summary = run_training(config, out, overwrite=flags.overwrite, show_progress=show_progress, notify=_note)
    _print_summary(summary, as_json=flags.json_output)


def _check_config_before_torch(job: str, flags: TrainingFlags, tree: dict[str, Any]) -> None:
    """The first pass of ``new_run_config`` and the method's name, checked before the jobs (so torch) are
    imported: a misspelt ``--set`` key, a bad value or an unknown method answers at once."""
    from kdcli.config import build_config
    from kdcli.registry import check_method_name

    config = build_config(defaults={"job": job}, file=flags.config, flags=tree, overrides=flags.set or [])
    if config.method.name is not None:
        check_method_name(config.method.name)


MAX_SEEDS = 1000  # runs in one seed group


def parse_seeds(text: str | None) -> list[int] | None:
    """``0,1,2``, ``0-4`` or a mix (``0-2,7``) as a list of distinct seeds, in order: ASCII digits only,
    at most ``MAX_SEEDS`` seeds, each at most ``MAX_SEED``; a range is checked by its size before it is listed."""
    if text is None:
        return None
    if len(text) > 21 * MAX_SEEDS:  # longer than MAX_SEEDS seeds of 20 digits: refused before it is split
        raise UsageError(f"--seeds: at most {MAX_SEEDS} seeds in one group")
    seeds: dict[int, None] = {}  # insertion-ordered set: de-duplication in linear time
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not (_ascii_number(first) and (not dash or _ascii_number(last))):
            raise UsageError(f"--seeds takes seeds and ranges such as 0,1,2 or 0-4 (got {one_line(text, 80)!r})")
        low, high = int(first), int(last if dash else first)
        if high > MAX_SEED:
            raise UsageError(f"--seeds: a seed must be at most {MAX_SEED} (2^63 - 1)")
        if high < low:
            raise UsageError(f"--seeds range {part.strip()!r} is empty: write it low-high")
        if high - low >= MAX_SEEDS:
            raise UsageError(f"--seeds: at most {MAX_SEEDS} seeds in one group (got the range {part.strip()})")
        seeds.update(dict.fromkeys(range(low, high + 1)))
        if len(seeds) > MAX_SEEDS:
            raise UsageError(f"--seeds: at most {MAX_SEEDS} seeds in one group")
    return list(seeds)


def _ascii_number(text: str) -> bool:
    # str.isdigit() accepts '¹' and other Unicode digits that int() then refuses; 25 digits bound int()'s work.
    return 0 < len(text) <= 25 and text.isascii() and text.isdigit()


def _train_seeds(config: RunConfig, seeds: list[int], out: Path, flags: TrainingFlags) -> None:
    from kdcli.jobs.seeds import run_seeds

    def report(seed: int, summary: dict[str, Any], read_back: bool) -> None:
        if not flags.quiet:
            how = " (finished before, read back)" if read_back else ""
            _note(f"seed {seed}: test top-1 {summary['test']['top1']:.4f}{how}")

    if not flags.quiet:
        _note(f"seeds {', '.join(map(str, seeds))} into {out}/seed-N (rerun the same command, or --resume {out}, to continue)")
    result = run_seeds(config, out, seeds, overwrite=flags.overwrite, show_progress=not flags.quiet, notify=_note, on_seed=report)
    if flags.json_output:
        _print_json(result.as_dict())
        return
    per_seed = result.per_seed
    table = Table(title=escape(f"{result.job} · {result.method} · {len(per_seed)} seeds · {result.out}"))
    table.add_column("metric")
    table.add_column("mean ± std", justify="right")
    for seed in per_seed:
        table.add_column(f"seed {seed}", justify="right")
    for name, stats in result.aggregate.items():
        table.add_row(name, f"{stats['mean']:.4f} ± {stats['std']:.4f}", *(f"{values[name]:.4f}" for values in per_seed.values()))
    print_table(table)


def _default_out(job: str, method: str) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("under torchrun pass --out explicitly so every process writes to the same run directory")
    return Path("runs") / f"{job}-{method}-{datetime.now():%Y%m%d-%H%M%S}"


def _print_summary(summary: TrainingSummary, *, as_json: bool) -> None:
    if not summary.is_main:
        return  # under torchrun only rank 0 reports
    if as_json:
        _print_json(summary.as_dict())
        return
    table = Table(title=escape(f"{summary.config.job} · {summary.config.method.name} · {summary.run_dir}"))
    for column in ("model", "role", "test top-1", "top-5", "NLL", "ECE"):
        table.add_column(column, justify="right" if column not in ("model", "role") else "left")
    rows = [(summary.teacher_arch, "teacher", summary.teacher_test)] if summary.teacher_test else []
    rows.append((summary.config.model.name, "student" if summary.config.job == "distill" else "teacher", summary.test))
    for arch, role, report in rows:
        table.add_row(arch, role, f"{report['top1']:.4f}", f"{report['top5']:.4f}", f"{report['nll']:.4f}", f"{report['ece']:.4f}")
    print_table(table)
    if summary.skipped_steps:
        stdout.print(f"skipped {summary.skipped_steps} steps with a non-finite loss (train.nonfinite_loss=skip)")
    if summary.teacher_relation is not None:
        relation = summary.teacher_relation
        stdout.print(f"teacher vs student: [bold]{relation.kind}[/bold]: {escape('; '.join(relation.facts()))}", highlight=False, soft_wrap=True)
    diagnostics = summary.history[-1].get("method", {}) if summary.history else {}
    if diagnostics:  # whatever the method reported for its last epoch (e.g. fusion-ratio statistics)
        stdout.print("method, last epoch: " + "  ".join(f"{name} {value:.4g}" for name, value in diagnostics.items()), soft_wrap=True)
    stdout.print(f"checkpoint: {summary.run_dir / 'last.safetensors'}", markup=False, soft_wrap=True)


@app.command(epilog="Examples: kdcli teach  ·  kdcli teach --model cifar_resnet32x4 --data cifar100 --epochs 240 --set schedule.name=multistep --set schedule.milestones=[150,180,210]")
@reports_errors
@training_options(without=("cache_teacher",))
def teach(
    method: Annotated[Optional[str], typer.Option("--method", help=f"Teacher-training method (default {DEFAULT_METHODS['teach']}; kdcli methods list).", show_default=False)] = None,
    *,
    flags: TrainingFlags,
) -> None:
    """Train a teacher and save safetensors checkpoints every K epochs."""
    _train("teach", method, None, flags)


@app.command(epilog="Examples: kdcli distill --teacher runs/t/last.safetensors  ·  kdcli distill --teacher t.safetensors --method kd --set method.temperature=4  ·  kdcli distill --teacher t.safetensors --cache-teacher")
@reports_errors
@training_options()
def distill(
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="Teacher: a kdcli checkpoint (.safetensors), or timm:NAME for timm's pretrained weights (timm:resnet50.a1_in1k, timm:local-dir:PATH).", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=f"Distillation method (default {DEFAULT_METHODS['distill']}; kdcli methods list).", show_default=False)] = None,
    *,
    flags: TrainingFlags,
) -> None:
    """Train a student from a teacher checkpoint with a distillation method."""
    _train("distill", method, teacher, flags)


@app.command("eval", epilog="Examples: kdcli eval runs/t/last.safetensors  ·  kdcli eval s.safetensors --split val --json  ·  kdcli eval s.safetensors --noise-std 0.1")
@reports_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A kdcli checkpoint (.safetensors).", show_default=False)],
    data: DataOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = False,
    split: Annotated[str, typer.Option("--split", help=f"Which split: {', '.join(EVAL_SPLITS)}.")] = "test",
    device: DeviceOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Evaluation batch size.")] = 512,
    noise_std: Annotated[float, typer.Option("--noise-std", help="Gaussian noise sigma on the 0..1 pixel scale added to every input (0 = clean).")] = 0.0,
    noise_photons: Annotated[Optional[float], typer.Option("--noise-photons", help="Poisson-Gaussian noise: photons at pixel value 1 (fewer = noisier).", show_default=False)] = None,
    noise_seed: Annotated[int, typer.Option("--noise-seed", help="Seed of the noise: the same seed gives every checkpoint the same noisy inputs.")] = 0,
    json_output: JsonOption = False,
) -> None:
    """Report top-1/top-5, NLL, ECE, Brier (and the distance to p* on synthetic data), on clean or noisy inputs."""
    from kdcli.jobs.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        checkpoint, data=data, data_root=data_root, download=download, split=split, device=device or "auto", batch_size=batch_size,
        noise_std=noise_std, noise_photons=noise_photons, noise_seed=noise_seed,
    )
    if json_output:
        _print_json(report)
        return
    noise = report["noise"]
    condition = "" if noise is None else f" · noise σ={noise['std']:g}" + (f" photons={noise['photons']:g}" if noise["photons"] else "") + f" seed {noise['seed']}"
    table = Table(title=escape(f"{report['arch']} · {report['data']} {report['split']}{condition}"), caption=escape(str(checkpoint)))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, f"{value:.4f}")
    print_table(table)
    if report["lineage"]:
        stdout.print("lineage: " + " <- ".join([report["arch"], *map(_teacher_words, report["lineage"])]), markup=False, soft_wrap=True)


def _teacher_words(teacher: dict[str, Any]) -> str:
    """``cifar_resnet14 (standard, epoch 3, sha256 1a2b3c4d, clean val top-1 0.8123)``."""
    facts = [teacher.get("method", "?"), f"epoch {teacher.get('epoch', '?')}", f"sha256 {str(teacher.get('sha256', ''))[:12]}"]
    if teacher.get("clean_top1") is not None:
        facts.append(f"clean {teacher.get('clean_split', 'val')} top-1 {teacher['clean_top1']:.4f}")
    return f"{teacher.get('arch', '?')} ({', '.join(facts)})"


@app.command(epilog="Examples: kdcli predict runs/t/last.safetensors cat.jpg dog.png  ·  kdcli predict s.safetensors photos/*.jpg --top-k 3 --json")
@reports_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A kdcli checkpoint (.safetensors).", show_default=False)],
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE...", help="Image files (PNG, JPEG, ...).", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="How many classes to print per image.")] = 5,
    device: DeviceOption = None,
    json_output: JsonOption = False,
) -> None:
    """Print the top-k classes of image files (resized and center-cropped like the image-folder recipe)."""
    from kdcli.jobs.classify import classify_images

    rows = classify_images(checkpoint, images, top_k=top_k, device=device or "auto")
    if json_output:
        _print_json(rows)
        return
    table = Table(title=escape(f"predict · {checkpoint}"))
    for column in ("image", "rank", "class", "probability"):
        table.add_column(column, justify="right" if column in ("rank", "probability") else "left")
    for row in rows:
        for rank, entry in enumerate(row["top"], start=1):
            label = str(entry["class"]) if entry["name"] is None else f"{entry['class']} {entry['name']}"
            table.add_row(escape(row["image"]) if rank == 1 else "", str(rank), escape(label), f"{entry['probability']:.4f}")
    print_table(table)


def _numbers(text: str | None, flag: str, kind: type[float] | type[int]) -> tuple[Any, ...] | None:
    if text is None:
        return None
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated {kind.__name__}s (got {text!r})") from None


def _input_size(text: str | None) -> tuple[int, int, int] | None:
    size = _numbers(text, "--input-size", int)
    if size is not None and (len(size) != 3 or min(size) <= 0):
        raise UsageError(f"--input-size takes C,H,W, three positive integers (got {text!r})")
    return size


@app.command(epilog="Examples: kdcli convert ckpt_epoch_240.pth --arch cifar_resnet32x4 -o resnet32x4.safetensors  ·  kdcli convert t.pth --arch resnet18 --data imagefolder:tiny -o t.safetensors")
@reports_errors
def convert(
    source: Annotated[Path, typer.Argument(help="A PyTorch checkpoint (.pth/.pt), read with torch.load(weights_only=True).", show_default=False)],
    arch: Annotated[str, typer.Option("--arch", help="The architecture the weights belong to (timm or cifar_* zoo name).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The kdcli checkpoint to write (.safetensors).", show_default=False)],
    key: Annotated[Optional[str], typer.Option("--key", help="Entry holding the state_dict (dotted); default: the file itself or state_dict/model/... .", show_default=False)] = None,
    rename: Annotated[Optional[list[str]], typer.Option("--rename", help="Rename a parameter-name prefix: OLD=NEW (repeatable; NEW may be empty).", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="The data set the model was trained on: takes its classes, input size and normalization.", show_default=False)] = None,
    data_root: DataRootOption = None,
    download: DownloadOption = False,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Class count (default: rows of the classifier weight).", show_default=False)] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="Input shape C,H,W (default: --data, else the arch's; CIFAR-100 for the cifar_* zoo).", show_default=False)] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel normalization mean, comma-separated.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel normalization std, comma-separated.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Import a model trained elsewhere (e.g. a RepDistiller teacher) as a kdcli checkpoint."""
    from kdcli.jobs.convert import InputSpec, convert_checkpoint

    if num_classes is not None and num_classes <= 0:
        raise UsageError(f"--num-classes must be positive (got {num_classes})")
    spec = InputSpec(num_classes, _input_size(input_size), _numbers(mean, "--mean", float), _numbers(std, "--std", float))
    summary = convert_checkpoint(
        source, output, arch=arch, key=key, renames=rename, data=data, data_root=data_root, download=download,
        spec=spec, overwrite=overwrite,
    )
    report = summary.as_dict()
    if json_output:
        _print_json(report)
        return
    renamed = ", ".join(f"{old!r}->{new!r}" for old, new in summary.renamed.items()) or "none"
    stdout.print(
        f"{summary.source} -> {summary.output}: {summary.arch}, {summary.num_tensors} tensors, "
        f"{report['num_classes']} classes, input {tuple(report['input_size'])}, data {report['data'] or 'unknown (eval needs --data)'}, "
        f"renamed {renamed}",
        markup=False,
        soft_wrap=True,
    )


@app.command(
    "sweep-checkpoints",
    epilog="Examples: kdcli sweep-checkpoints runs/teacher --model cifar_resnet8 --out runs/sweep  ·  "
    "kdcli sweep-checkpoints runs/standard runs/soteacher --every 5 --epochs 15 --out runs/sweep",
)
@reports_errors
def sweep_checkpoints(
    teacher_runs: Annotated[list[Path], typer.Argument(metavar="TEACHER_RUN_DIR", help="Teacher run directories (kdcli teach --out); several share one plot.", show_default=False)],
    method: Annotated[Optional[str], typer.Option("--method", help=f"Distillation method (default {DEFAULT_METHODS['distill']}).", show_default=False)] = None,
    model: ModelOption = None,
    data_root: DataRootOption = None,
    download: DownloadOption = False,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Student checkpoint every K epochs (default: last only).", show_default=False)] = None,
    seed: SeedOption = None,
    seeds: SeedsOption = None,
    device: DeviceOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    every: Annotated[int, typer.Option("--every", help="Use every K-th saved teacher checkpoint, counted back from the last.")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", help="Sweep directory; rerun with the same --out to continue (default runs/sweep-METHOD-TIME).", show_default=False)] = None,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Distill a student from every saved teacher checkpoint with one recipe; tabulate and plot teacher vs student."""
    from kdcli.jobs.sweep import build_recipe, find_teacher_runs, run_seeded_sweep, run_sweep

    seed_list = parse_seeds(seeds)
    if seed_list is not None and seed is not None:
        raise UsageError("give --seed or --seeds, not both")
    runs = find_teacher_runs(teacher_runs, every)
    flags = TrainingFlags(
        model=model, data_root=data_root, download=download, epochs=epochs, batch_size=batch_size, lr=lr, save_every=save_every, seed=seed, device=device,
    )
    tree = flags.config_tree()
    if method is not None:
        tree["method"] = {"name": method}
    recipe = build_recipe(runs, file=config, flags=tree, overrides=set_ or [])
    out = out or _default_out("sweep", recipe.config.method.name)
    if not quiet:
        count = sum(len(run.checkpoints) for run in runs)
        stderr.print(f"sweep: {count} students into {out} (rerun with --out {out} to continue)", markup=False, soft_wrap=True)

    def report_entry(row: dict[str, Any], done: int, total: int) -> None:
        if not quiet:
            line = f"[{done}/{total}] {row['teacher']} epoch {row['teacher_epoch']}: teacher {row['teacher_top1']:.4f}, student {row['student_top1']:.4f}"
            stderr.print(line, markup=False, soft_wrap=True)

    options = {"show_progress": not quiet, "on_entry": report_entry, "notify": _note}
    if seed_list is None:
        _print_sweep(run_sweep(runs, recipe, out, overwrite=overwrite, **options), as_json=json_output)
        return
    _print_seeded_sweep(run_seeded_sweep(runs, recipe, out, seed_list, overwrite=overwrite, **options), as_json=json_output)


def _print_seeded_sweep(seeded: SeededSweepResult, *, as_json: bool) -> None:
    if as_json:
        _print_json(seeded.as_dict())
        return
    table = Table(title=escape(f"sweep-checkpoints · seeds {', '.join(map(str, seeded.sweeps))} · {seeded.out}"))
    for column in ("teacher", "teacher epoch", "teacher top-1", "student top-1 (mean ± std)", "student ECE (mean ± std)"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for row in seeded.rows:
        table.add_row(escape(row["teacher"]), str(row["teacher_epoch"]), f"{row['teacher_top1']:.4f}",
                      f"{row['student_top1_mean']:.4f} ± {row['student_top1_std']:.4f}", f"{row['student_ece_mean']:.4f} ± {row['student_ece_std']:.4f}")
    print_table(table)
    stdout.print(f"results: {seeded.out / 'results.json'}; each seed's sweep, table and plot in {seeded.out}/seed-N", markup=False, soft_wrap=True)


def _print_sweep(result: SweepResult, *, as_json: bool) -> None:
    if as_json:
        _print_json(result.as_dict())
        return
    table = Table(title=escape(f"sweep-checkpoints · {result.out}"))
    for column in ("teacher", "teacher epoch", "teacher top-1", "teacher ECE", "teacher p* TV (train)", "student top-1"):
        table.add_column(column, justify="left" if column == "teacher" else "right")
    for row in result.rows:
        distance = row["teacher_pstar_tv_train"]
        table.add_row(
            escape(row["teacher"]), str(row["teacher_epoch"]), f"{row['teacher_top1']:.4f}", f"{row['teacher_ece']:.4f}",
            "-" if distance is None else f"{distance:.4f}", f"{row['student_top1']:.4f}",
        )
    print_table(table)
    stdout.print(f"results: {result.out / 'results.csv'}, {result.out / 'results.json'}", markup=False, soft_wrap=True)
    if result.plot_written:
        stdout.print(f"plot: {result.out / 'sweep.png'}", markup=False, soft_wrap=True)
    else:
        stdout.print("plot: skipped, matplotlib is missing (pip install 'kdcli[plot]')", markup=False)


RunDirsArgument = Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run directories or seed groups (--seeds).", show_default=False)]


@app.command(epilog="Examples: kdcli compare runs/kd runs/dkd  ·  kdcli compare runs/kd-seeds runs/dkd-seeds --csv > table.csv  ·  kdcli compare runs/* --json")
@reports_errors
def compare(
    run_dirs: RunDirsArgument,
    json_output: JsonOption = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print the table as CSV (every metric, mean and std).")] = False,
) -> None:
    """One table of the final and best metrics of runs (a seed group shows mean ± std over its seeds)."""
    from kdcli.jobs.compare import TABLE_METRICS, compare_runs, rows_csv

    if json_output and csv_output:
        raise UsageError("give --json or --csv, not both")
    rows = compare_runs(run_dirs)
    if json_output:
        _print_json(rows)
        return
    if csv_output:
        sys.stdout.write(rows_csv(rows))
        return
    table = Table(title="kdcli compare", caption="test/*: the deployed model on the test split; best/*: the epoch with the highest val top-1; a seed group shows mean ± std")
    for column in ("run", "method", "model", "seeds", "epochs", *TABLE_METRICS):
        table.add_column(column, justify="left" if column in ("run", "method", "model") else "right", no_wrap=True)
    for row in rows:
        cells = [_stat_cell(row["metrics"].get(name), integer=name == "best/epoch") for name in TABLE_METRICS]
        seeds = "-" if row["seeds"] is None else str(len(row["seeds"]))
        table.add_row(escape(row["label"]), escape(str(row["method"] or "")), escape(str(row["model"] or "")), seeds, str(row["epochs"]), *cells)
    print_table(table)
    for row in rows:
        if row["unfinished"]:
            _note(f"note: {row['label']}: not finished, no test metrics: {', '.join(row['unfinished'])}")


def _stat_cell(stats: dict[str, float] | None, *, integer: bool = False) -> str:
    if stats is None:
        return "-"
    digits = ".1f" if integer and stats["n"] > 1 else ".0f" if integer else ".4f"
    return f"{stats['mean']:{digits}}" + (f"±{stats['std']:{digits}}" if stats["n"] > 1 else "")


@app.command(epilog="Examples: kdcli plot runs/kd runs/adaptive-fusion -o curves.png  ·  kdcli plot runs/kd-seeds -o kd.png")
@reports_errors
def plot(
    run_dirs: RunDirsArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG file to write.", show_default=False)],
) -> None:
    """Learning curves of runs side by side: each loss term, train/val top-1, lr and the method's per-epoch numbers."""
    from kdcli.jobs.plot import plot_runs

    result = plot_runs(run_dirs, output)
    stdout.print(f"plot: {output} ({len(result.titles)} panels: {', '.join(result.titles)})", markup=False, soft_wrap=True)
    if result.left_out:
        _note(f"note: {len(result.left_out)} more panels left out (at most {len(result.titles)}): {one_line(', '.join(result.left_out), 200)}")


@app.command(epilog="Examples: kdcli export runs/s/last.safetensors hub/student  ·  kdcli export runs/s/best.safetensors hub/student --push me/resnet18-kd  ·  kdcli export runs/s/last.safetensors deploy --format onnx")
@reports_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A kdcli checkpoint (.safetensors).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="The folder to write: model.safetensors, config.json, README.md (or model.onnx).", show_default=False)],
    export_format: Annotated[str, typer.Option("--format", help="timm: the folder timm loads from the Hub; onnx: model.onnx (dynamic batch; preprocessing and class names in its metadata; needs kdcli[onnx]).")] = "timm",
    push: Annotated[Optional[str], typer.Option("--push", help="Also upload the folder to this Hugging Face Hub repo (needs huggingface_hub and a login).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty OUT_DIR.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Write a checkpoint as the folder timm loads from the Hub: timm.create_model("local-dir:OUT_DIR", pretrained=True); or as ONNX."""
    if export_format not in EXPORT_FORMATS:
        raise UsageError(f"--format takes {' or '.join(EXPORT_FORMATS)} (got {export_format!r})")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise UsageError(f"{out_dir} already exists and is not empty; choose another OUT_DIR or pass --overwrite")
    from kdcli.jobs.export import export_checkpoint

    result = export_checkpoint(checkpoint, out_dir, format=export_format, overwrite=overwrite, push_to=push)
    if json_output:
        _print_json(result.as_dict())
        return
    stdout.print(f"{result.checkpoint} -> {result.out}: {', '.join(result.files)} ({result.arch})", markup=False, soft_wrap=True)
    if result.format == "onnx":
        stdout.print('load: onnxruntime.InferenceSession(".../model.onnx"); preprocessing in get_modelmeta().custom_metadata_map', markup=False, soft_wrap=True)
    else:
        load = f'timm.create_model("local-dir:{result.out}", pretrained=True)'
        stdout.print(f"load: {load}" + ("" if result.timm_native else " after `import kdcli.models` (a kdcli architecture)"), markup=False, soft_wrap=True)
    if result.pushed_to:
        stdout.print(f"pushed: https://huggingface.co/{result.pushed_to}", markup=False, soft_wrap=True)


@methods_app.command("list")
@reports_errors
def methods_list(
    json_output: JsonOption = False,
    check: Annotated[bool, typer.Option("--check", help="Import every plugin (so torch) and check it, instead of reading its source.")] = False,
) -> None:
    """Every installed method with its role, summary and providing distribution (read from each plugin's source: fast)."""
    from kdcli.registry import method_plugins

    rows = [
        {
            "name": plugin.name,
            "roles": sorted(plugin.facts.roles) if plugin.facts is not None else [],
            "teacher": plugin.facts.teacher_use if plugin.facts is not None else None,
            "summary": plugin.facts.summary if plugin.facts is not None else "",
            "distribution": plugin.distribution,
            "version": plugin.version,
            "error": plugin.error,
        }
        for plugin in method_plugins(check=check)
    ]
    if json_output:
        _print_json(rows)
        return
    table = Table(title="kdcli methods")
    for column in ("name", "role", "teacher", "summary", "from"):
        table.add_column(column)
    for row in rows:
        summary = row["summary"] if row["error"] is None else f"[red]unusable: {escape(row['error'])}[/red]"
        source = f"{row['distribution']} {row['version']}".strip()
        table.add_row(row["name"], "/".join(row["roles"]), row["teacher"] or "", summary, source)
    print_table(table)


@methods_app.command("show")
@reports_errors
def methods_show(name: Annotated[str, typer.Argument(help="Method name.")], json_output: JsonOption = False) -> None:
    """A method's hyperparameters: type, default and help (set with --set method.KEY=VALUE)."""
    from kdcli.registry import get_method

    method = get_method(name)
    rows = _describe_params(method)
    if json_output:
        _print_json({"name": name, "roles": sorted(method.roles), "teacher": method.teacher_use, "params": rows})
        return
    stdout.print(f"[bold]{name}[/bold]: {method.summary}  (roles: {', '.join(sorted(method.roles))}; teacher: {method.teacher_use})")
    table = Table()
    for column in ("key", "type", "default", "help"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(f"method.{row['name']}", escape(row["type"]), escape(json.dumps(row["default"])), escape(row["help"]))
    print_table(table)


def _describe_params(method: type[Method]) -> list[dict[str, Any]]:
    schema = method.Params.model_json_schema()
    rows = []
    for name, declared in method.Params.model_fields.items():
        prop = schema.get("properties", {}).get(name, {})
        rows.append({"name": name, "type": _schema_type(prop), "default": declared.get_default(call_default_factory=True), "help": declared.description or ""})
    return rows


def _schema_type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(value) for value in prop["enum"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(option) for option in prop["anyOf"])
    text = prop.get("type", "any")
    if text == "array":
        text = f"list[{_schema_type(prop.get('items', {}))}]"
    bounds = [f"{symbol}{prop[key]}" for key, symbol in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")) if key in prop]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _version_callback(value: bool) -> None:
    if value:
        stdout.print(f"kdcli {__version__} (plugin API {API_VERSION})")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Knowledge distillation from the command line."""
