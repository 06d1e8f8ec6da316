"""kill -9, Ctrl-C and SIGTERM sent to real kdcli processes at seeded random moments.

After every kill the run directory must hold only whole, loadable files, and
a copy of it continued with ``--resume`` must end bit for bit where an
uninterrupted run ends (deterministic mode on CPU, resume state included).
Kill points alternate between a random time and a pause inside a chosen file
write (before or after its rename), so kills land inside checkpoint writes too.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from faults import DETERMINISTIC, assert_same_run, one_error_line
from kdcli.checkpoint import load_checkpoint, load_state, read_checkpoint_info, read_state_label
from kdcli_forkserver import ForkServer, KdcliProcess

EPOCHS = 3
RUN = ["--epochs", EPOCHS, "--save-every", 1, *DETERMINISTIC]
KILLS = {"teach": 6, "distill": 5}
WRITES = ("config.json", "resume.safetensors", "last.safetensors", "best.safetensors", "epoch_000", "metrics.jsonl")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@dataclass(frozen=True)
class Straight:
    """An uninterrupted run: the reference, and how long it took."""

    run: Path
    seconds: float


@pytest.fixture(scope="module")
def straight(server: ForkServer, teacher_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Straight]:
    runs: dict[str, Straight] = {}

    def reference(job: str) -> Straight:
        if job not in runs:
            out = tmp_path_factory.mktemp("straight") / job
            started = time.monotonic()
            process = server.run(*job_args(job, teacher_run), "--out", out, *RUN)
            assert process.returncode == 0, process.stderr
            runs[job] = Straight(out, time.monotonic() - started)
        return runs[job]

    return reference


def job_args(job: str, teacher_run: Path) -> list[Any]:
    return ["teach"] if job == "teach" else ["distill", "--method", "kd", "--teacher", teacher_run / "last.safetensors"]


@dataclass(frozen=True)
class KillPoint:
    delay: float | None  # seconds after the start
    pause: dict[str, Any] | None  # or inside this write (see kdcli_forkserver)


def kill_points(rng: random.Random, run_seconds: float, markers: Path) -> Iterator[KillPoint]:
    for index in range(1, 1000):
        if index % 2:
            yield KillPoint(delay=rng.uniform(0.05, run_seconds), pause=None)
        else:
            pause = {"file": rng.choice(WRITES), "nth": rng.randint(1, EPOCHS), "after_rename": rng.random() < 0.5, "marker": str(markers / f"paused-{index}")}
            yield KillPoint(delay=None, pause=pause)


def wait_for(condition: Callable[[], bool], process: KdcliProcess, timeout: float = 120.0) -> bool:
    """Poll until ``condition`` holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    return True


def kill_at(process: KdcliProcess, point: KillPoint) -> bool:
    """SIGKILL at ``point``; False when the process ended on its own first."""
    if point.pause is not None:
        reached = wait_for(Path(point.pause["marker"]).exists, process)
    else:
        deadline = time.monotonic() + point.delay
        reached = wait_for(lambda: time.monotonic() >= deadline, process)
    if not reached:
        return False
    process.send(signal.SIGKILL)
    returncode = process.wait()
    assert returncode in (-signal.SIGKILL, 0), process.stderr
    return returncode == -signal.SIGKILL


def check_killed_run(run: Path) -> bool:
    """Every file a kill left is whole; returns whether ``--resume`` applies (config.json was written)."""
    if not (run / "config.json").exists():
        assert not (run / "resume.safetensors").exists()
        return False
    json.loads((run / "config.json").read_text())
    for path in [*run.glob("*.safetensors"), *run.glob("checkpoints/*.safetensors")]:
        load_state(path) if path.name == "resume.safetensors" else load_checkpoint(path)
    if not (run / "resume.safetensors").exists():
        assert not (run / "last.safetensors").exists()
        return True
    saved = load_state(run / "resume.safetensors")["epoch"]
    # The resume state is written first: the other files of its epoch may be one epoch behind it.
    if (run / "last.safetensors").exists():
        assert read_checkpoint_info(run / "last.safetensors").epoch in (saved - 1, saved)
    else:
        assert saved == 1
    metrics = run / "metrics.jsonl"
    assert (len(metrics.read_text().splitlines()) if metrics.exists() else 0) in (saved - 1, saved)
    return True


def epoch_seconds(run: Path) -> float:
    """How long this process took for epoch 1 (machines and loads differ; so do waits based on it)."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["time_s"]


def resume_copy_to_the_end(server: ForkServer, job: str, run: Path, copy: Path, reference: Path) -> None:
    shutil.copytree(run, copy)
    process = server.run(job, "--resume", copy, "-q")
    assert process.returncode == 0, process.stderr
    assert not list(copy.rglob("*.tmp")), "a killed write's temporary file was left behind"
    assert_same_run(reference, copy)


@pytest.mark.parametrize("job", KILLS)
def test_kill_9_at_random_points_always_resumes_bit_exact(job: str, server: ForkServer, straight: Callable[[str], Straight], teacher_run: Path, tmp_path: Path) -> None:
    reference = straight(job)
    points = kill_points(random.Random(f"kill-9-{job}"), reference.seconds, tmp_path)
    run, kills, fresh = tmp_path / "run", 0, True
    inside_writes = 0
    # Which points a run reaches depends on timing (a resumed run may write best.safetensors less often):
    # go on until the kills include at least two inside a write.
    for _ in range(6 * KILLS[job]):
        if kills >= KILLS[job] and inside_writes >= 2:
            break
        point = next(points)
        args = [*job_args(job, teacher_run), "--out", run, "--overwrite", *RUN] if fresh else [job, "--resume", run, "-q"]
        process = server.start(*args, pause=point.pause)
        if not kill_at(process, point):  # it finished before the kill point: a complete run
            assert process.wait() == 0, process.stderr
            assert_same_run(reference.run, run)
            fresh = True
            continue
        kills += 1
        inside_writes += point.pause is not None
        fresh = not check_killed_run(run)
        if fresh:  # killed before config.json existed: there is nothing to resume
            refused = server.run(job, "--resume", run)
            assert refused.returncode == 2 and "not a kdcli run directory" in one_error_line(refused.stderr)
        else:
            resume_copy_to_the_end(server, job, run, tmp_path / f"copy-{kills}", reference.run)
    assert kills >= KILLS[job] and inside_writes >= 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_exact_state_and_says_how_to_resume(signum: int, server: ForkServer, straight: Callable[[str], Straight], tmp_path: Path) -> None:
    reference = straight("teach")
    run = tmp_path / "run"
    process = server.start("teach", "--out", run, *RUN)
    assert wait_for((run / "metrics.jsonl").exists, process)  # epoch 1 is saved
    time.sleep(random.Random(signum).uniform(0.2, 0.6) * epoch_seconds(run))  # somewhere in epoch 2
    process.send(signum)
    assert process.wait() == 128 + signum
    line = one_error_line(process.stderr)
    verb = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[signum]
    assert line.startswith(f"kdcli: error: {verb} ({signal.Signals(signum).name}): ")
    assert read_state_label(run / "resume.safetensors") in line
    assert line.endswith(f"; continue with: kdcli teach --resume {run}")

    finished = server.run("teach", "--resume", run, "-q")
    assert finished.returncode == 0, finished.stderr
    assert_same_run(reference.run, run)


def test_second_ctrl_c_stops_at_once_and_leaves_whole_files(server: ForkServer, straight: Callable[[str], Straight], tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "paused"
    # The first Ctrl-C makes the run save; that save (the second write of resume.safetensors) hangs until the second one.
    pause = {"file": "resume.safetensors", "nth": 2, "after_rename": False, "marker": str(marker)}
    process = server.start("teach", "--out", run, *RUN, pause=pause)
    assert wait_for((run / "metrics.jsonl").exists, process)
    time.sleep(epoch_seconds(run) / 3)  # inside epoch 2, past the check after epoch 1's save
    process.send(signal.SIGINT)
    assert wait_for(marker.exists, process)
    sent = time.monotonic()
    process.send(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert time.monotonic() - sent < 10  # the write it cut short would have taken minutes
    line = one_error_line(process.stderr)
    assert f"interrupted, stopped at once; {run / 'resume.safetensors'} holds the state after epoch 1; continue with: kdcli teach --resume {run}" in line
    assert not list(run.rglob("*.tmp"))
    assert load_state(run / "resume.safetensors")["epoch"] == 1 and read_checkpoint_info(run / "last.safetensors").epoch == 1

    finished = server.run("teach", "--resume", run, "-q")
    assert finished.returncode == 0, finished.stderr
    assert_same_run(straight("teach").run, run)
