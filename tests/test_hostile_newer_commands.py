"""Hostile input to the newer commands (predict, compare, plot, export, --seeds, streamed data, Mixup/CutMix):
one ``kdcli: error:`` line, no traceback, no hang, nothing changed on disk."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from conftest import TINY, run_cli
from kdcli.checkpoint import load_checkpoint, save_checkpoint
from test_bad_input import assert_clean_error
from test_hostile_input import image_folder
from test_overwrite_owned_only import snapshot

DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture()
def no_hang() -> Iterator[None]:
    """Fail, rather than hang the suite, when a command blocks (a FIFO opened for reading waits for a writer)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("the command blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# -- predict ----------------------------------------------------------------------------------------------


def _png_with_text(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", text, zip=True)  # 20 MB of text in a few kB: past Pillow's MAX_TEXT_CHUNK
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_predict_refuses_a_fifo_without_opening_it(teacher_run: Path, tmp_path: Path, no_hang: None) -> None:
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    assert_clean_error(run_cli("predict", teacher_run / "last.safetensors", fifo), 1, "not a regular file")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda tmp: Image.new("L", (1, 1_000_000)).save(tmp / "strip.png") or tmp / "strip.png", "exceed predict's budget"),
        (lambda tmp: _png_with_text(tmp / "text.png", "x" * 20_000_000), "MAX_TEXT_CHUNK"),
        (lambda tmp: (tmp / "empty.png").write_bytes(b"") and tmp / "empty.png" or tmp / "empty.png", "cannot read image"),
    ],
    ids=["1x1000000-strip", "png-text-chunk-20MB", "empty-file"],
)
def test_predict_refuses_images_before_decoding(teacher_run: Path, tmp_path: Path, make: object, fragment: str) -> None:
    image = make(tmp_path)  # type: ignore[operator]
    assert_clean_error(run_cli("predict", teacher_run / "last.safetensors", image), 1, fragment)


def test_predict_refuses_a_huge_input_size_in_metadata(teacher_run: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    weights, info = load_checkpoint(teacher_run / "last.safetensors")
    huge = tmp_path / "huge.safetensors"
    save_checkpoint(huge, weights, replace(info, input_size=(3, 60_000, 60_000)))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert_clean_error(run_cli("predict", huge, tmp_path / "a.png"), 1, "60000x60000", "budget")


def test_predict_prints_markup_in_paths_as_text(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # short relative paths: the table does not wrap them
    folder = Path("[") / "x]"  # the path holds "[/x]", a closing tag rich would choke on
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "[red]a.png")
    checkpoint = Path(shutil.copy(teacher_run / "last.safetensors", folder / "[b]m.safetensors"))
    result = run_cli("predict", checkpoint, folder / "[red]a.png")
    assert result.exit_code == 0, result
    assert "predict · [/x]/[b]m.safetensors" in result.stdout and "[/x]/[red]a.png" in result.stdout


# -- streamed and in-memory image folders -------------------------------------------------------------------


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_a_fifo_in_an_image_folder_is_refused_before_reading(tmp_path: Path, in_memory: str, no_hang: None) -> None:
    image_folder(tmp_path / "images", 2)
    os.mkfifo(tmp_path / "images" / "val" / "c1" / "pipe.png")
    out = tmp_path / "out"
    result = run_cli("teach", "--data", f"imagefolder:{tmp_path / 'images'}", "--set", f"data.in_memory={in_memory}", "--out", out, *TINY)
    assert_clean_error(result, 1, "pipe.png", "not a regular file")
    assert not out.exists()


def test_workers_are_capped_at_the_cpu_count() -> None:
    from kdcli.data.vision import _worker_count

    cpus = os.cpu_count() or 1
    count, notes = _worker_count(500)
    assert count == cpus and notes == (f"note: data.workers=500 capped at {cpus}, the number of CPUs",)
    assert _worker_count(1) == (1, ()) and _worker_count(None) == (min(8, cpus), ())


# -- config values (teach and --dry-run validate alike) -----------------------------------------------------


CONFIG_FILES = {
    "dup.yaml": "train:\n  epochs: 1\n  epochs: 2\n",
    "dup.json": '{"train": {"epochs": 1, "epochs": 2}}',
    "list-section.json": '{"train": []}',
    "null-section.yaml": "train:\n",
}

BAD_VALUES = {
    "yaml-duplicate-key": (["--config", "{tmp}/dup.yaml"], "duplicate key 'epochs' (line 3)"),
    "json-duplicate-key": (["--config", "{tmp}/dup.json"], "duplicate key 'epochs'"),
    "section-as-list": (["--config", "{tmp}/list-section.json"], "train is a section and must be a mapping of its keys, not a list"),
    "empty-section": (["--config", "{tmp}/null-section.yaml"], "train is a section and must be a mapping of its keys, not empty"),
    "epochs-true": (["--set", "train.epochs=true"], "epochs: expected a number, got true"),
    "workers-false": (["--set", "data.workers=false"], "workers: expected a number, got false"),
    "crop-pct-1e-9": (["--set", "data.crop_pct=1e-9"], "data.crop_pct"),
    "mixup-alpha-1e-320": (["--set", "data.mixup_alpha=1e-320"], "data.mixup_alpha: 0 (off) or between 0.001 and 1000.0"),
    "cutmix-alpha-1e-320": (["--set", "data.cutmix_alpha=1e-320"], "data.cutmix_alpha: 0 (off) or between"),
    "seeds-unicode-digit": (["--seeds", "¹"], "--seeds takes seeds"),
    "seeds-2^63": (["--seeds", str(2**63)], "at most 9223372036854775807"),
    "seeds-million": (["--seeds", "0-1000000"], "at most 1000 seeds"),
    "seeds-many-parts": (["--seeds", ",".join(map(str, range(0, 3003, 3)))], "at most 1000 seeds"),
}


@pytest.fixture(scope="module")
def config_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("configs")
    for name, text in CONFIG_FILES.items():
        (tmp / name).write_text(text)
    return tmp


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("args", "fragment"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_refused_before_anything_is_written(
    args: list[str], fragment: str, dry_run: bool, config_files: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    arguments = [arg.format(tmp=config_files) for arg in args]
    result = run_cli("teach", "--out", out, *arguments, *(["--dry-run"] if dry_run else []), *TINY)
    assert_clean_error(result, 2, fragment)
    assert not out.exists()


def test_yaml_merge_keys_still_override() -> None:
    from kdcli.config import _UniqueKeyLoader

    import yaml

    loaded = yaml.load("base: &b {epochs: 1}\ntrain:\n  <<: *b\n  epochs: 2\n", Loader=_UniqueKeyLoader)  # noqa: S506
    assert loaded["train"] == {"epochs": 2}


# -- files read back by compare, plot, export and seed groups ------------------------------------------------


BROKEN_FILES = {
    "metrics-deep": ("metrics.jsonl", DEEP + "\n", "nested deeper than 32 levels"),
    "metrics-wrong-type": ("metrics.jsonl", "[1, 2]\n", "each epoch record must be a JSON object"),
    "metrics-epoch-string": ("metrics.jsonl", '{"epoch": "one"}\n', "without an integer epoch"),
    "metrics-not-utf8": ("metrics.jsonl", "\udcff", "cannot read"),
    "summary-deep": ("summary.json", '{"test": ' + DEEP + "}", "nested deeper than 32 levels"),
    "summary-truncated": ("summary.json", '{"test": {"top1": 0.5', "not valid JSON for a run summary"),
    "summary-test-string": ("summary.json", '{"test": "high"}', "'test' must be a JSON object"),
    "summary-list": ("summary.json", "[]", "a run summary must be a JSON object"),
    "config-list": ("config.json", "[]", "a run config must be a JSON object"),
    "config-nested-too-deep": ("config.json", "[" * 40 + "]" * 40, "nested deeper than"),
}


@pytest.fixture()
def broken_run(teacher_run: Path, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    name, text, fragment = request.param
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    (run / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    return run, fragment


@pytest.mark.parametrize("broken_run", BROKEN_FILES.values(), ids=BROKEN_FILES.keys(), indirect=True)
@pytest.mark.parametrize("command", ["compare", "plot"])
def test_compare_and_plot_read_broken_files_in_one_line(broken_run: tuple[Path, str], command: str, tmp_path: Path) -> None:
    run, fragment = broken_run
    before = snapshot(tmp_path)
    args = ["-o", tmp_path / "curves.png"] if command == "plot" else ["--json"]
    assert_clean_error(run_cli(command, run, *args), 2, fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("text", "code"), [('{"test": ' + DEEP + "}", 2), ("[]", 1)], ids=["deep", "list"])
def test_export_reads_a_broken_summary_in_one_line(teacher_run: Path, tmp_path: Path, text: str, code: int) -> None:
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    (run / "summary.json").write_text(text)
    assert_clean_error(run_cli("export", run / "last.safetensors", tmp_path / "hub"), code, "summary.json")
    assert not (tmp_path / "hub").exists()


def test_export_leaves_a_wrong_typed_metric_out_of_the_card(teacher_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    (run / "summary.json").write_text('{"test": {"top1": "high", "nll": 0.5}, "best_epoch": null}')
    result = run_cli("export", run / "last.safetensors", tmp_path / "hub")
    assert result.exit_code == 0, result
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| test nll | 0.5000 |" in card and "test top1" not in card


@pytest.mark.parametrize("text", [DEEP, '{"format": "kdcli-seeds", "recipe": {}, "seeds": [true]}', "null"], ids=["deep", "seed-true", "null"])
def test_a_broken_seed_group_index_is_one_line(tmp_path: Path, text: str) -> None:
    group = tmp_path / "group"
    group.mkdir()
    (group / "seeds.json").write_text(text)
    before = snapshot(tmp_path)
    assert_clean_error(run_cli("teach", "--resume", group, "-q"), 2, "seeds.json")
    assert snapshot(tmp_path) == before


def test_plot_of_800_keys_draws_at_most_its_panel_cap(teacher_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    MAX_PANELS = 6  # the cap's logic, at a size that draws fast  # noqa: N806
    monkeypatch.setattr("kdcli.jobs.plot.MAX_PANELS", MAX_PANELS)
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record["method"] = {f"k{index}": index * 0.5 for index in range(800)}
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    result = run_cli("plot", run, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result
    assert f"({MAX_PANELS} panels:" in result.stdout and f"panels left out (at most {MAX_PANELS})" in result.stderr


def test_compare_json_prints_null_for_non_finite_numbers(teacher_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(teacher_run, tmp_path / "run"))
    summary = json.loads((run / "summary.json").read_text())
    summary["test"]["nll"] = math.inf
    (run / "summary.json").write_text(json.dumps(summary))  # Python writes Infinity, which json.loads reads back
    result = run_cli("compare", run, "--json")
    assert result.exit_code == 0, result
    rows = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert rows[0]["metrics"]["test/nll"]["mean"] is None
    assert "warning: non-finite values printed as null" in result.stderr


# -- --dry-run checks what the run checks; seed groups ---------------------------------------------------------


def test_dry_run_plans_the_seed_group(tmp_path: Path) -> None:
    out = tmp_path / "group"
    result = run_cli("teach", "--out", out, "--seeds", "0-2", "--dry-run", *TINY)
    assert result.exit_code == 0, result
    plan = json.loads(result.stdout)["plan"]
    assert plan["seeds"] == [0, 1, 2] and plan["action"] == "create" and plan["seed_dirs"][2] == str(out / "seed-2")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a folder kdcli did not make: refused by the dry run as by the run
    assert_clean_error(run_cli("teach", "--out", out, "--seeds", "0-2", "--dry-run", *TINY), 2, "is not a seed group")
    assert_clean_error(run_cli("teach", "--out", out, "--seeds", "0-2", *TINY), 2, "is not a seed group")


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_run_directory_that_cannot_be_created_is_refused_before_training(dry_run: bool) -> None:
    result = run_cli("teach", "--out", "/proc/kdcli-x/run", *(["--dry-run"] * dry_run), *TINY)
    assert_clean_error(result, 2, "cannot create run directory /proc/kdcli-x/run", "in /proc")


@pytest.fixture(scope="module")
def teach_group(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-seed teach group (seed 0, one epoch of cifar_resnet8)."""
    group = tmp_path_factory.mktemp("seeds") / "group"
    assert run_cli("teach", "--out", group, "--seeds", "0", "--epochs", 1, "--model", "cifar_resnet8", *TINY).exit_code == 0
    return group


def test_distill_resume_refuses_a_teach_seed_group(teach_group: Path) -> None:
    before = snapshot(teach_group)
    assert_clean_error(run_cli("distill", "--resume", teach_group, "-q"), 2, "is a teach seed group", f"kdcli teach --resume {teach_group}")
    assert snapshot(teach_group) == before


def test_a_seed_group_reads_only_the_folders_kdcli_names(teach_group: Path, tmp_path: Path) -> None:
    group = Path(shutil.copytree(teach_group, tmp_path / "group"))
    shutil.copytree(group / "seed-0", group / "seed-03")  # not a name kdcli writes: it read seed-3, which does not exist
    result = run_cli("compare", group, "--json")
    assert result.exit_code == 0, result
    assert result.json()[0]["seeds"] == [0]


def test_library_warnings_are_one_line_each(teacher_run: Path, tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8))
    palette.putpalette(list(range(256)) * 3)
    palette.save(tmp_path / "palette.png", transparency=bytes([0, 16, 255]))  # PIL warns when it converts this to RGB
    result = run_cli("predict", teacher_run / "last.safetensors", tmp_path / "palette.png")
    assert result.exit_code == 0, result
    assert result.stderr.splitlines() == [
        "warning: UserWarning: Palette images with Transparency expressed in bytes should be converted to RGBA images"
    ], result
    (tmp_path / "empty.png").write_bytes(b"")
    failed = run_cli("predict", teacher_run / "last.safetensors", tmp_path / "palette.png", tmp_path / "empty.png")
    assert_clean_error(failed, 1, "cannot read image")
    assert "warnings.warn" not in failed.stderr
