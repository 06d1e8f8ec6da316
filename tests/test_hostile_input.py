"""Inputs that used to end in a traceback (or were silently accepted): each now ends in one ``kdcli: error:`` line."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, run_cli
from kdcli.checkpoint import load_checkpoint, save_checkpoint
from test_bad_input import assert_clean_error
from test_plugins import Distributions, distributions  # noqa: F401 -- the fixture

KDCLI = [sys.executable, "-m", "kdcli"]
DEEP = "[" * 5000 + "]" * 5000
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, name in zip("abcdef", "bcdefg")
)

# (arguments, exit code, fragment); {tmp} is a fresh directory holding the files hostile_files writes.
HOSTILE = {
    "batch-of-one-with-batch-norm": (["teach", "--model", "resnet10t", "--batch-size", "1", "--set", "data.synthetic.num_train=40"], 2, "batch-norm"),
    "zero-steps-per-epoch": (["teach", "--val-split", "0.95", "--set", "data.synthetic.num_train=20", "--batch-size", "64"], 2, "too few for one batch"),
    "lr-1e308": (["teach", "--lr", "1e308", *TINY], 2, "optim.lr"),
    "huge-seed": (["teach", "--seed", str(10**23), *TINY], 2, "train.seed"),
    "huge-split-seed": (["teach", "--set", f"data.split_seed={10**23}", *TINY], 2, "data.split_seed"),
    "num-train-1e9": (["teach", "--set", "data.synthetic.num_train=1000000000"], 2, "GiB of memory"),
    "synthetic-image-200000": (["teach", "--set", "data.synthetic.image_size=200000"], 2, "GiB of memory"),
    "imagefolder-image-size-1e6": (["teach", "--data", "imagefolder:{tmp}/images", "--set", "data.image_size=1000000"], 2, "GiB of memory"),
    "rotation-inf": (["teach", "--set", "data.rotation=inf", *TINY], 2, "data.rotation"),
    "rotation-nan": (["teach", "--set", "data.rotation=NaN", *TINY], 2, "data.rotation"),
    "model-empty": (["teach", "--model", "", *TINY], 2, "model.name"),
    "set-job-on-teach": (["teach", "--set", "job=distill", *TINY], 2, "drop job=distill"),
    "config-job-on-teach": (["teach", "--config", "{tmp}/distill.toml", *TINY], 2, "drop job=distill"),
    "set-nested-deep": (["teach", "--set", f"method.x={DEEP}"], 2, "nested deeper than"),
    "set-key-deep": (["teach", "--set", "a" + ".a" * 100 + "=1"], 2, "nested deeper than"),
    "config-json-deep": (["teach", "--config", "{tmp}/deep.json"], 2, "nested deeper than"),
    "config-yaml-deep": (["teach", "--config", "{tmp}/deep.yaml"], 2, "nested deeper than"),
    "config-billion-laughs": (["teach", "--config", "{tmp}/laughs.yaml"], 2, "more than 100000 values"),
    "one-class-image-folder": (["teach", "--data", "imagefolder:{tmp}/one-class", *TINY], 1, "at least 2"),
    "decompression-bomb": (["teach", "--data", "imagefolder:{tmp}/bomb", *TINY], 1, "decompression bomb"),
    "symlink-loop": (["teach", "--data", "imagefolder:{tmp}/loop", *TINY], 1, "symlink loop"),
    "eval-noise-nan": (["eval", "{teacher}", "--noise-std", "nan"], 2, "--noise-std"),
    "eval-noise-inf": (["eval", "{teacher}", "--noise-std", "inf"], 2, "--noise-std"),
    "eval-photons-nan": (["eval", "{teacher}", "--noise-photons", "nan"], 2, "--noise-photons"),
    "eval-noise-seed-huge": (["eval", "{teacher}", "--noise-seed", str(10**23)], 2, "--noise-seed"),
    "resume-distill-run-with-teach": (["teach", "--resume", "{student}"], 2, "is a distill run; continue it with kdcli distill"),
}


def image_folder(root: Path, classes: int, *, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> None:
    for split in ("train", "val"):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(2):
                Image.new(mode, size).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "distill.toml").write_text('job = "distill"\n')
    (tmp / "deep.json").write_text('{"train": ' + DEEP + "}")
    (tmp / "deep.yaml").write_text("train:\n  x: " + DEEP + "\n")
    (tmp / "laughs.yaml").write_text(LAUGHS)
    image_folder(tmp / "images", 2)
    image_folder(tmp / "one-class", 1)
    image_folder(tmp / "bomb", 2)
    Image.new("1", (14_000, 14_000)).save(tmp / "bomb" / "train" / "c0" / "0.png")  # 196 Mpixel in a few kB
    image_folder(tmp / "loop", 2)
    (tmp / "loop" / "train" / "c0" / "again").symlink_to(tmp / "loop" / "train")
    return tmp


@pytest.fixture(scope="module")
def student_run(teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("student") / "run"
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8", "--epochs", 1, "--out", out, *TINY)
    assert result.exit_code == 0, result
    return out


@pytest.mark.parametrize(("args", "code", "fragment"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_ends_in_one_line(
    args: list[str], code: int, fragment: str, hostile_files: Path, teacher_run: Path, student_run: Path, tmp_path: Path
) -> None:
    places = {"tmp": hostile_files, "teacher": teacher_run / "last.safetensors", "student": student_run}
    arguments = [str(arg).format(**places) for arg in args]
    out = tmp_path / "out"
    if arguments[0] == "teach" and "--resume" not in arguments:
        arguments[1:1] = ["--out", str(out)]
    assert_clean_error(run_cli(*arguments), code, fragment)
    assert not out.exists(), "a refused run created its directory"


def test_error_lines_stay_short(tmp_path: Path) -> None:
    huge = "x" * 100_000
    result = run_cli("teach", "--out", tmp_path / "r", "--set", f"train.epochs={huge}")
    assert_clean_error(result, 2, "train.epochs")
    assert len(result.stderr) < 1000


def test_data_set_plugin_that_raises(distributions: Distributions, tmp_path: Path) -> None:
    distributions.add(
        "kdcli-broken-data", {"kdcli.datasets": {"broken": "broken_data:build"}},
        {"broken_data": "def build(request):\n    raise ValueError('cannot read\\nthe labels file')\n"},
    )
    result = run_cli("teach", "--data", "broken", "--out", tmp_path / "r", *TINY)
    assert_clean_error(result, 1, "data set 'broken' failed to load: ValueError: cannot read the labels file")
    assert not (tmp_path / "r").exists()


def test_method_plugin_calling_sys_exit_is_isolated(distributions: Distributions) -> None:
    distributions.add(
        "kdcli-exits", {"kdcli.methods": {"exits": "exits_on_import:Method"}},
        {"exits_on_import": "import sys\nsys.exit('bye\\nfrom a plugin')\n"},
    )
    listing = run_cli("methods", "list", "--json")
    assert listing.exit_code == 0, listing
    rows = {row["name"]: row for row in listing.json()}
    assert rows["exits"]["error"] == "SystemExit: bye from a plugin" and rows["kd"]["error"] is None
    assert_clean_error(run_cli("methods", "show", "exits"), 1, "SystemExit: bye from a plugin")


def test_eval_json_prints_null_for_non_finite_numbers(teacher_run: Path, tmp_path: Path) -> None:
    weights, info = load_checkpoint(teacher_run / "last.safetensors")
    broken = tmp_path / "nan.safetensors"
    save_checkpoint(broken, {key: value.float().fill_(math.nan) if value.is_floating_point() else value for key, value in weights.items()}, info)
    result = run_cli("eval", broken, "--json")
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)  # strict JSON: a bare NaN would not parse with the flag below
    json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert report["metrics"]["nll"] is None
    assert "warning: non-finite values printed as null: metrics.nll" in result.stderr


@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_ctrl_c_while_importing_or_training_is_one_line(delay: float, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [*KDCLI, "teach", "--out", str(tmp_path / "r"), "--epochs", "50", *TINY]
    # Before kdcli's own code runs, Python itself owns SIGINT: on a loaded machine its start-up alone can
    # outlast ``delay``, so the delay counts from the time a bare start-up takes now.
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import kdcli.launch"], env=env, check=True)
    startup = time.monotonic() - started
    # The suite may run with SIGINT ignored (``make test &``, nohup); a user's kdcli starts with it at its default.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, preexec_fn=_default_sigint)
    time.sleep(startup + delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 130 and len(lines) == 1 and lines[0].startswith("kdcli: error: interrupted"), stderr


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_started_with_sigint_ignored_it_stays_ignored_and_sigterm_stops(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [*KDCLI, "teach", "--model", "cifar_resnet8", "--out", str(tmp_path / "r"), "--epochs", "50", *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    while not (tmp_path / "r" / "resume.safetensors").exists() and process.poll() is None:  # training has begun
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None, "SIGINT stopped a kdcli started with SIGINT ignored"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode != 0 and len(lines) == 1 and "terminated (SIGTERM)" in lines[0], stderr
