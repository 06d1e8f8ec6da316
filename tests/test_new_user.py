"""New-user frictions of issue 17: distill's data from its teacher, --dry-run, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, run_cli
from test_bad_input import assert_clean_error
from test_ownership import snapshot


def test_distill_takes_the_teachers_data_set_by_default(teacher_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--model", "cifar_resnet8", "--epochs", 1, "--batch-size", 48, "-q", "--out", out)
    assert result.exit_code == 0, result
    data = json.loads((out / "config.json").read_text())["data"]
    assert (data["synthetic"]["num_train"], data["synthetic"]["num_test"]) == (480, 240)  # the teacher's, not the 10,000 default
    # A flag still overrides it; a shape that no longer fits says where the data came from.
    shape = run_cli("distill", "--teacher", teacher_run / "last.safetensors", "--set", "data.synthetic.image_size=24", "--out", tmp_path / "b", *TINY)
    assert_clean_error(shape, 2, "(3, 24, 24)", "takes the teacher's data set")


def test_dry_run_prints_the_resolved_config_and_plan_and_writes_nothing(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (tmp_path / "pets" / split / label).mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (20, 30), (index * 40, 0, 0)).save(tmp_path / "pets" / split / label / f"{index}.png")
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    result = run_cli("teach", "--data", f"imagefolder:{tmp_path / 'pets'}", "--set", "data.image_size=32", "--out", out, "--dry-run")
    assert result.exit_code == 0, result
    report = result.json()
    data = report["config"]["data"]
    assert (data["crop_padding"], data["hflip"], data["image_size"]) == (4, True, 32)  # the image-folder recipe, resolved
    assert report["config"]["model"]["name"] == "cifar_resnet20" and report["config"]["method"]["name"] == "standard"
    assert report["plan"]["action"] == "create" and report["plan"]["data"]["num_classes"] == 2
    assert report["plan"]["data"]["mean"] == [0.485, 0.456, 0.406]
    assert report["plan"]["data"]["storage"] == "in memory" and report["plan"]["data"]["memory_bytes"] == 12 * 3 * 32 * 32
    streamed = run_cli("teach", "--data", f"imagefolder:{tmp_path / 'pets'}", "--set", "data.in_memory=false", "--set", "data.workers=0",
                       "--out", out, "--dry-run")
    assert streamed.exit_code == 0, streamed
    assert {key: streamed.json()["plan"]["data"][key] for key in ("storage", "workers")} == {"storage": "streamed from files", "workers": 0}
    assert not out.exists() and snapshot(tmp_path) == before
    assert_clean_error(run_cli("teach", "--resume", out, "--dry-run"), 2, "drop --dry-run")


def test_predict_prints_the_top_classes_of_image_files(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for label, colour in (("cat", (250, 20, 20)), ("dog", (20, 20, 250))):
            (tmp_path / "pets" / split / label).mkdir(parents=True)
            for index in range(4):
                Image.new("RGB", (24, 20), colour).save(tmp_path / "pets" / split / label / f"{index}.png")
    out = tmp_path / "run"
    trained = run_cli(
        "teach", "--data", f"imagefolder:{tmp_path / 'pets'}", "--set", "data.image_size=16", "--model", "cifar_resnet8",
        "--epochs", 1, "--batch-size", 4, "--val-split", 0, "--out", out, "-q",
    )
    assert trained.exit_code == 0, trained
    images = [tmp_path / "pets" / "val" / "cat" / "0.png", tmp_path / "pets" / "val" / "dog" / "0.png"]
    result = run_cli("predict", out / "last.safetensors", *images, "--top-k", 5, "--json")
    assert result.exit_code == 0, result
    rows = result.json()
    assert [row["image"] for row in rows] == [str(image) for image in images]
    for row in rows:
        assert len(row["top"]) == 2 and {entry["name"] for entry in row["top"]} == {"cat", "dog"}  # k capped at the class count
        assert sum(entry["probability"] for entry in row["top"]) == pytest.approx(1.0, abs=1e-5)
        assert row["top"][0]["probability"] >= row["top"][1]["probability"]
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert_clean_error(run_cli("predict", out / "last.safetensors", broken), 1, "cannot read image")
    assert_clean_error(run_cli("predict", out / "last.safetensors", images[0], "--top-k", 0), 2, "--top-k")
