"""Per built-in method: dynamo graphs, recompiles after epoch 1 and graph breaks of a 3-epoch compiled run.

Runs the real CLI in-process with torch.compile's backend set to dynamo's "eager" (graphs are
captured exactly as for inductor; only code generation is skipped), or the backend named as the
first argument.  Only Trainer.train_epoch and the CLI are used, so it runs on older versions too:
``PYTHONPATH=OLD_TREE python benchmarks/compile_counters.py`` gives the "before" column.
"""
from __future__ import annotations

import functools, sys, tempfile
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from typer.testing import CliRunner
from kdcli.cli import app
from kdcli.engine import Trainer

TINY = ["--model", "cifar_resnet8", "--epochs", "3", "--batch-size", "64", "-q",
        "--set", "data.synthetic.num_train=232", "--set", "data.synthetic.num_test=64", "--set", "data.synthetic.image_size=16"]
METHODS = {"standard": [], "soteacher": [], "kd": [], "tfkd-self": [], "tfkd-virtual": [],
           "feature-mimic": [], "adaptive-fusion": ["--set", "data.val_split=0.2"]}

def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    return r

def snapshot():
    return (counters["frames"].get("total", 0), counters["stats"].get("unique_graphs", 0),
            sum(counters["graph_break"].values()))

def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "eager"
    scratch = Path(tempfile.mkdtemp())
    r = cli("teach", "--out", scratch / "teacher", *TINY)
    assert r.exit_code == 0, r.output
    teacher = scratch / "teacher" / "last.safetensors"
    real_compile = torch.compile
    torch.compile = functools.partial(real_compile, backend=backend)
    original = Trainer.train_epoch
    per_epoch = []
    def train_epoch(self, epoch):
        out = original(self, epoch)
        per_epoch.append(snapshot())
        return out
    Trainer.train_epoch = train_epoch
    print(f"{'method':16} {'frames':>6} {'graphs':>6} {'graphs after ep1':>16} {'breaks':>6}  exit  {backend}")
    for method, extra in METHODS.items():
        torch._dynamo.reset(); counters.clear(); per_epoch.clear()
        job = "teach" if method in ("standard", "soteacher") else "distill"
        t = [] if job == "teach" or method == "tfkd-virtual" else ["--teacher", teacher]
        r = cli(job, "--method", method, *t, "--out", scratch / method, *TINY, *extra, "--set", "train.compile=true")
        frames, graphs, breaks = snapshot()
        after = graphs - per_epoch[0][1] if per_epoch else float("nan")
        tail = "" if r.exit_code == 0 else (r.output.strip().splitlines() or [repr(r.exception)])[-1][:150]
        if r.exception is not None and r.exit_code != 0 and not tail:
            tail = repr(r.exception)[:150]
        print(f"{method:16} {frames:6} {graphs:6} {after:16} {breaks:6}  {r.exit_code:4}  {tail}", flush=True)
        for reason, n in counters["graph_break"].items():
            print(f"    break x{n}: {reason[:140]}")

if __name__ == "__main__":
    main()
