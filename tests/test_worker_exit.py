"""After ``kill -9`` of the main process its streaming loader workers end at once and print nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_hostile_input import image_folder

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

LOADER = """
import sys, torch
from kdcli.data.vision import load_imagefolder
from kdcli.data.stream import StreamingLoader
bundle = load_imagefolder(sys.argv[1], image_size=8, in_memory=False, workers=2)
batches = iter(StreamingLoader(bundle.train, batch_size=2, shuffle=True, device=torch.device("cpu")))
next(batches)
print("ready", flush=True)
sys.stdin.read()  # until killed
"""


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_loader_workers_end_with_a_killed_main_process(tmp_path: Path) -> None:
    image_folder(tmp_path / "images", 2)
    main = subprocess.Popen(
        [sys.executable, "-c", LOADER, str(tmp_path / "images")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert main.stdout is not None and main.stdout.readline() == "ready\n"
    workers = _children(main.pid)
    assert len(workers) >= 1
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.monotonic() + 2.5  # torch's own watchdog alone takes up to 5 s
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "a loader worker outlived its killed parent"
    _, errors = main.communicate(timeout=10)  # the pipe closes once no worker holds it
    assert "Traceback" not in errors, errors
