"""CLI start-up: wall time and peak memory of whole ``kdcli`` processes against ``python -c pass``.

``kdcli --help`` and ``kdcli COMMAND --help`` must not import torch (goal: under
0.3 s and 100 MB on the 2-core development machine).  ``kdcli methods list`` reads
each plugin's facts from its source (goal: under 1 s); ``--check`` imports every
plugin, so torch, and is shown for reference.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import scaled

RUNS = scaled(5, 1)
GOAL_SECONDS, GOAL_MB = 0.3, 100.0
LIST_GOAL_SECONDS = 1.0


def _kdcli() -> list[str]:
    script = Path(sys.executable).with_name("kdcli")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kdcli"]


# Run from a small fresh interpreter: a forked child starts with its parent's peak RSS (this
# benchmark's parent has torch loaded), so the parent that forks the measured command must be small.
_PROBE = """
import os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, _, usage = os.wait4(process.pid, 0)
print(time.perf_counter() - started, usage.ru_maxrss / 1024)
"""


_BARE_TYPER = """
import typer
app = typer.Typer(rich_markup_mode="rich", add_completion=False)
@app.command()
def run(count: int = 1) -> None:
    \"\"\"Do nothing.\"\"\"
app()
"""


def measure(command: list[str], runs: int = RUNS) -> tuple[float, float]:
    """Median wall seconds and median peak RSS (MB) of ``runs`` fresh processes, after one warm-up."""
    walls, peaks = [], []
    for index in range(runs + 1):
        probe = subprocess.run([sys.executable, "-c", _PROBE, *command], capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        wall, peak = map(float, probe.stdout.split())
        if index:  # the first run warms the file cache
            walls.append(wall)
            peaks.append(peak)  # Linux reports KiB; /1024 above gives MB
    return statistics.median(walls), statistics.median(peaks)


def main() -> None:
    base_wall, base_peak = measure([sys.executable, "-c", "pass"])
    print(f"startup: python -c pass {base_wall:.3f} s, {base_peak:.0f} MB", flush=True)
    floor_wall, floor_peak = measure([sys.executable, "-c", _BARE_TYPER, "--help"])
    print(f"startup: a bare one-command Typer app --help {floor_wall:.3f} s ({floor_wall / base_wall:.1f}x), {floor_peak:.0f} MB  (Typer's own floor)", flush=True)
    kdcli = _kdcli()
    goals = {"help": (GOAL_SECONDS, GOAL_MB), "list": (LIST_GOAL_SECONDS, GOAL_MB)}
    for args, goal in ((["--help"], "help"), (["distill", "--help"], "help"), (["methods", "list"], "list"), (["methods", "list", "--check"], None)):
        wall, peak = measure(kdcli + args)
        seconds, megabytes = goals.get(goal, (math.inf, math.inf))
        met = "met" if wall < seconds and peak < megabytes else "missed"
        target = f"  (goal < {seconds} s and < {megabytes:.0f} MB: {met})" if goal else "  (imports the plugins, so torch)"
        print(f"startup: kdcli {' '.join(args)} {wall:.3f} s ({wall / base_wall:.1f}x), {peak:.0f} MB{target}", flush=True)


if __name__ == "__main__":
    main()
