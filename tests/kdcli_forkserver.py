"""Real ``kdcli`` processes, started fast, for tests that kill and signal them.

Importing torch and timm costs seconds per process, so a server process
imports kdcli once and forks one child per request; each child runs the real
command line (``kdcli.launch.main``, the console entry point) in its own process, to be killed at any
moment.  A child can be told to pause inside a chosen file write (in
``os.fsync``, before or after the rename), so a kill or a second Ctrl-C lands
exactly there.

Protocol on the server's stdin/stdout, one JSON object per line:
  request  {"args": [...], "stdout": PATH, "stderr": PATH, "pause": null | PAUSE}
           PAUSE = {"file": NAME_PART, "nth": N, "after_rename": BOOL, "marker": PATH}
  replies  {"pid": PID}, then when the child ends {"returncode": RC} (RC < 0: killed by signal -RC)
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAUSE_SECONDS = 600.0


# -- the server side (runs as a script) -------------------------------------------------


def _pausing_fsync(real_fsync: Callable[[int], None], pause: dict[str, Any]) -> Callable[[int], None]:
    """``os.fsync`` that sleeps inside the ``nth`` write of a file named like ``pause["file"]``.

    Before the rename the temporary file is complete but not yet in place;
    after it the directory fsync has not happened yet.
    """
    matches = 0
    pause_at_next_fsync = False

    def pause_here() -> None:
        Path(pause["marker"]).touch()
        time.sleep(PAUSE_SECONDS)  # a signal handler that raises ends it early

    def fsync(descriptor: int) -> None:
        nonlocal matches, pause_at_next_fsync
        if pause_at_next_fsync:  # the directory fsync right after the rename
            pause_at_next_fsync = False
            pause_here()
        name = os.path.basename(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)
        if pause["file"] in name and name.endswith(".tmp"):
            matches += 1
            if matches == pause["nth"]:
                if pause["after_rename"]:
                    pause_at_next_fsync = True
                else:
                    pause_here()

    return fsync


def _run_child(request: dict[str, Any]) -> int:
    import kdcli.launch

    for descriptor, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(path, flags), descriptor)
    if request.get("pause"):
        os.fsync = _pausing_fsync(os.fsync, request["pause"])
    sys.argv = ["kdcli", *request["args"]]
    try:
        kdcli.launch.main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    return 0


def serve() -> None:
    import kdcli.cli  # noqa: F401  (the expensive import, done once before any fork)

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 99  # an exception escaped kdcli: its traceback goes to the child's stderr
            try:
                code = _run_child(request)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    os._exit(0)  # skip tearing torch down: nothing is left to flush


# -- the test side ----------------------------------------------------------------------


@dataclass
class KdcliProcess:
    """One forked ``kdcli`` process."""

    pid: int
    stdout_path: Path
    stderr_path: Path
    server: ForkServer
    returncode: int | None = None

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 300.0) -> int:
        if self.returncode is None:
            self.returncode = self.server.reply(timeout)["returncode"]
        return self.returncode

    def poll(self) -> int | None:
        """The return code if the process has ended, else None."""
        if self.returncode is None and not self.server.replies.empty():
            self.wait()
        return self.returncode

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()


class ForkServer:
    """Client of the server above; one child runs at a time."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment,
        )
        self.replies: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self.replies.put(line)

    def reply(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.replies.get(timeout=timeout))

    def start(self, *args: object, pause: dict[str, Any] | None = None) -> KdcliProcess:
        self.count += 1
        stdout, stderr = (self.workdir / f"{self.count:03d}.{name}" for name in ("out", "err"))
        request = {"args": [str(arg) for arg in args], "stdout": str(stdout), "stderr": str(stderr), "pause": pause}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return KdcliProcess(self.reply(timeout=120)["pid"], stdout, stderr, self)

    def run(self, *args: object) -> KdcliProcess:
        """Start and wait for the end; the caller checks ``returncode``."""
        process = self.start(*args)
        process.wait()
        return process

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


if __name__ == "__main__":
    serve()
