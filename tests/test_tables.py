"""The paper-table recipes (examples/tables) and their runner (examples/tables/run_table.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm

from kdcli.config import build_config
from kdcli.jobs.build import resolve_run
from kdcli.registry import load_model_plugins

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TABLES = sorted((EXAMPLES / "tables").glob("*.toml"))
# RepDistiller and mdistiller train these students with lr 0.01, every other network with 0.05.
LOW_LR_MODELS = {"cifar_mobilenetv2", "cifar_shufflenetv1", "cifar_shufflenetv2"}
# mdistiller's configs/cifar100/dkd: NCKD weight beta per (teacher, student); 8 where unset.
DKD_BETA = {
    ("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0,
}


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_table", EXAMPLES / "tables" / "run_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_table"] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run_table = load_runner()


def resolved(run) -> object:  # noqa: ANN001 - a run_table.Run
    flags = {"job": run.job} | ({"teacher": "teacher.safetensors"} if run.teacher else {})
    return resolve_run(build_config(file=EXAMPLES / run.config, flags=flags))


@pytest.mark.parametrize("table", TABLES, ids=lambda path: path.stem)
def test_every_run_of_every_table_resolves_to_a_buildable_model(table: Path) -> None:
    load_model_plugins()
    _, rows = run_table.read_table(table, seeds=[0], teacher_seed=0)
    assert rows
    for run in run_table.all_runs(rows):
        spec = resolved(run)
        assert timm.is_model(spec.config.model.name), run.config
        assert spec.config.data.name == "cifar100" and spec.config.data.val_split == 0.0


def test_repdistiller_recipes_hold_the_papers_settings() -> None:
    _, rows = run_table.read_table(EXAMPLES / "tables" / "dkd.toml", seeds=[0], teacher_seed=0)
    _, crd_rows = run_table.read_table(EXAMPLES / "tables" / "crd.toml", seeds=[0], teacher_seed=0)
    for run in run_table.all_runs(rows + crd_rows):
        config = resolved(run).config
        assert (config.train.epochs, config.train.batch_size, config.schedule.milestones) == (240, 64, [150, 180, 210])
        assert (config.optim.momentum, config.optim.weight_decay, config.schedule.gamma) == (0.9, 5e-4, 0.1)
        assert config.optim.lr == (0.01 if config.model.name in LOW_LR_MODELS else 0.05), run.config
    for row in rows:
        teacher, student = row.name.split(" -> ")
        params = resolved(row.students["dkd"][0]).params
        assert (params.alpha, params.beta, params.temperature, params.warmup_epochs) == (1.0, DKD_BETA.get((teacher, student), 8.0), 4.0, 20)
    for row in crd_rows:
        params = resolved(row.students["kd"][0]).params
        assert (params.temperature, params.ce_weight, params.kd_weight) == (4.0, 0.1, 0.9)


def test_runner_trains_a_row_on_tiny_settings_and_reads_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    tiny = ["data.name=synthetic", "data.synthetic.num_train=96", "data.synthetic.num_test=48", "train.epochs=1", "train.batch_size=48"]
    argv = ["run_table.py", str(EXAMPLES / "tables" / "dkd.toml"), "--rows", "resnet56 -> resnet20", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + [arg for item in tiny for arg in ("--set", item)])
    run_table.main()
    results = json.loads((tmp_path / "dkd.json").read_text())["resnet56 -> resnet20"]
    assert set(results) == {"teacher", "student", "kd", "dkd"}
    assert all(len(values) == 1 for values in results.values())
    report = (tmp_path / "dkd.md").read_text()
    assert "| resnet56 -> resnet20 | dkd |" in report and "| 71.97 |" in report
    assert (tmp_path / "tables/kd/resnet20/from-tables_standard_resnet56-seed0/seed1/last.safetensors").is_file()
    assert (tmp_path / "tables/standard/resnet56/seed0/last.safetensors").is_file()  # the teacher has its own seed

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv)  # a rerun trains nothing: finished runs are read back
    run_table.main()
    assert json.loads((tmp_path / "dkd.json").read_text())["resnet56 -> resnet20"] == results


def test_runner_refuses_a_link_at_its_report_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    precious = tmp_path / "precious.md"
    precious.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "dkd.md").symlink_to(precious)
    monkeypatch.setattr(sys, "argv", ["run_table.py", str(EXAMPLES / "tables" / "dkd.toml"), "--rows", "resnet56 -> resnet20", "--out", str(out)])
    with pytest.raises(SystemExit) as stopped:
        run_table.main()
    assert stopped.value.code == 2 and "symbolic link" in capsys.readouterr().err
    assert precious.read_text() == "mine" and sorted(path.name for path in out.iterdir()) == ["dkd.md"]
