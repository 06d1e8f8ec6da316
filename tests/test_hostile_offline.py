"""A ``timm:NAME`` teacher without the network: the cache first, one ``kdcli: error:`` line within seconds otherwise,
nothing from the network in a dry run, and a Hub server that accepts connections but never answers cannot stall a run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants

from conftest import TINY, run_cli
from kdcli.jobs.common import pretrained_timm_model
from test_bad_input import assert_clean_error

REPO = "timm/test_resnet.r160_in1k"  # what timm:test_resnet resolves to


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own (huggingface_hub reads its location at call time)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


class SilentServer:
    """Accepts TCP connections and never answers: a Hub behind a broken proxy.  Counts what it accepted."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture()
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_offline_teacher_outside_the_cache_is_one_line_naming_what_to_fetch(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = run_cli("distill", "--teacher", "timm:test_resnet", "--out", tmp_path / "s", *TINY)
    assert_clean_error(result, 1, "HF_HUB_OFFLINE is set", f"hf download {REPO} model.safetensors", str(hub_cache), "timm:local-dir:PATH")
    assert not (tmp_path / "s").exists()


def test_a_cached_teacher_loads_without_the_network(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(1)
    weights = timm.create_model("test_resnet").state_dict()
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(weights, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    model, info = pretrained_timm_model("test_resnet", network=False)
    torch.testing.assert_close(model.state_dict(), weights)
    assert info.input_size == (3, 160, 160) and info.arch == "test_resnet"


def _kdcli(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kdcli", *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done, time.monotonic() - started


def test_a_hub_that_never_answers_fails_in_bounded_time(silent_server: SilentServer, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": silent_server.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    done, seconds = _kdcli(["distill", "--teacher", "timm:test_resnet", "--out", str(tmp_path / "s"), *TINY], env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("kdcli: error: "), done
    assert "ReadTimeout" in lines[0] and silent_server.endpoint in lines[0] and f"hf download {REPO}" in lines[0], done
    # No retries: the weights lookup, and huggingface_hub's own once-per-process user-agent registry fetch (3 s timeout).
    assert len(silent_server.accepted) <= 2
    assert seconds < 30, seconds  # a hang bound, not a speed figure: the request gives up after HUB_TIMEOUT_S (5 s) + start-up (user-agent fetch 3 s)
    assert not (tmp_path / "s").exists()


def test_a_dry_run_never_touches_the_network(silent_server: SilentServer, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": silent_server.endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    done, _ = _kdcli(["distill", "--teacher", "timm:test_resnet", "--out", str(tmp_path / "s"), "--dry-run", *TINY], env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "a dry run does not use the network" in lines[0], done
    assert silent_server.accepted == []


# -- a timm teacher's pretrained config, checked like user input (run and dry run alike) --------------------------


PRETRAINED_CFGS = {
    "1x60000": ({"input_size": [3, 1, 60000]}, 1, "input_size 1x60000", "within 8:1"),
    "60000x60000": ({"input_size": [3, 60000, 60000]}, 1, "input_size 60000x60000", "at most 4096 px"),
    "mean-of-2": ({"mean": [0.5, 0.5]}, 1, "mean and std need 3 values"),
    "nan-std": ({"std": [0.5, float("nan"), 0.5]}, 1, "std finite and positive"),
    "4096-at-batch-512": ({"input_size": [3, 4096, 4096]}, 2, "the timm teacher's 4096x4096 input at batch size 512", "teacher_resize=off"),
}


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_teacher_normalization import write_pretrained_folder

    folder = tmp_path_factory.mktemp("timm") / "pretrained"
    write_pretrained_folder(folder)
    return folder


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("change", "code", "fragments"), [(c, code, f) for c, code, *f in PRETRAINED_CFGS.values()], ids=PRETRAINED_CFGS.keys())
def test_a_bad_pretrained_config_is_one_line(
    pretrained_folder: Path, tmp_path: Path, change: dict, code: int, fragments: list[str], dry_run: bool
) -> None:
    folder = Path(shutil.copytree(pretrained_folder, tmp_path / "pretrained"))
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(change)
    (folder / "config.json").write_text(json.dumps(config))  # NaN as Python writes it, which json (and timm) read back
    result = run_cli("distill", "--teacher", f"timm:local-dir:{folder}", "--out", tmp_path / "s", *(["--dry-run"] * dry_run), *TINY)
    assert_clean_error(result, code, *fragments)
    assert "loss" not in result.stderr  # a NaN std is the teacher's config, not a training failure
    assert not (tmp_path / "s").exists()
