"""Hostile and broken files: hundreds of seeded mutations of a valid checkpoint and resume state.

Byte-level damage (truncation, bit flips, oversized or garbage headers) must
always end in a one-line ``KdcliError``.  Structural changes written with a
valid digest, as a hostile author could (wrong dtypes, shapes, keys,
metadata that is not JSON or has wrong values), must end in a ``KdcliError``
too.  A resume state whose skeleton is changed may also load when it keeps a
valid structure (a number in a history record, an empty optimizer slot); then
it must still train.  Nothing may raise anything else, hang, or unpickle.
"""

from __future__ import annotations

import json
import pickle
import random
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import TINY, run_cli
from kdcli.checkpoint import CHECKPOINT_FORMAT, STATE_FORMAT, load_state, load_tensors, save_tensors
from kdcli.config import load_resolved_config
from kdcli.data.bundle import DataBundle
from kdcli.engine import Trainer
from kdcli.errors import KdcliError
from kdcli.jobs.build import build_training, resolve_run
from kdcli.jobs.common import check_fits, checkpoint_data_config, load_data, model_from_checkpoint
from kdcli.method import Batch
from kdcli.rundir import RunDir
from kdcli.runtime import setup_runtime

CASES = {"checkpoint-bytes": 250, "checkpoint-structure": 150, "state-bytes": 100, "state-structure": 150}
SECONDS_PER_CASE = 10


@pytest.fixture(scope="module")
def source_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch cifar_resnet8 run: the valid files every mutation starts from."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    result = run_cli("teach", "--model", "cifar_resnet8", "--epochs", 1, "--out", out, *TINY)
    assert result.exit_code == 0, result
    return out


@pytest.fixture(scope="module")
def bundle(source_run: Path) -> DataBundle:
    return load_data(load_resolved_config(source_run / "config.json").data)


@pytest.fixture(scope="module")
def trainer(source_run: Path) -> Trainer:
    """A trainer built from the source run's config, as ``--resume`` builds it, to restore states into."""
    spec = resolve_run(load_resolved_config(source_run / "config.json"))
    bundle = load_data(spec.config.data)
    runtime = setup_runtime(spec.config.train)
    return build_training(spec, bundle, None, runtime, RunDir(source_run), show_progress=False).trainer


@contextmanager
def never_unpickling() -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a user file was unpickled")

    with pytest.MonkeyPatch.context() as patch:
        for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
            patch.setattr(module, name, refuse)
        yield


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"a case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(open_file: Callable[[], object]) -> str:
    """"error" for a clean one-line KdcliError, "loaded" for success; anything else fails the test."""
    with deadline(SECONDS_PER_CASE), never_unpickling():
        try:
            open_file()
        except KdcliError as exc:
            message = str(exc)
            assert message and "\n" not in message and "Traceback" not in message, message
            return "error"
    return "loaded"


# -- byte-level damage ------------------------------------------------------------------


def damage_bytes(raw: bytes, rng: random.Random) -> bytes:
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    kind = rng.choice(["truncate", "flip-header", "flip-anywhere", "oversized-header", "garbage-header-length", "garbage-header", "zero-range", "append", "empty", "random"])
    data = bytearray(raw)
    if kind == "truncate":
        return raw[: rng.randrange(len(raw))]
    if kind in ("flip-header", "flip-anywhere"):
        end = header_end if kind == "flip-header" else len(raw)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(end)
            data[position] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "oversized-header":
        return struct.pack("<Q", rng.randrange(len(raw), 2**64)) + raw[8:]
    if kind == "garbage-header-length":
        return struct.pack("<Q", rng.randrange(2**64)) + raw[8:]
    if kind == "garbage-header":
        start = rng.randrange(8, header_end)
        data[start:header_end] = bytes(rng.randrange(256) for _ in range(header_end - start))
        return bytes(data)
    if kind == "zero-range":
        start = rng.randrange(len(raw))
        data[start : start + rng.randint(1, 4096)] = bytes(min(4096, len(raw) - start))
        return bytes(data[: len(raw)])
    if kind == "append":
        return raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "empty":
        return b""
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))


@pytest.mark.parametrize(("kind", "name"), [("checkpoint-bytes", "last.safetensors"), ("state-bytes", "resume.safetensors")])
def test_damaged_bytes_always_end_in_one_line_errors(kind: str, name: str, source_run: Path, bundle: DataBundle, trainer: Trainer, tmp_path: Path) -> None:
    raw = (source_run / name).read_bytes()
    rng = random.Random(kind)
    target = tmp_path / name
    open_file = (lambda: open_checkpoint(target, bundle)) if name == "last.safetensors" else (lambda: restore(trainer, target))
    for case in range(CASES[kind]):
        damaged = damage_bytes(raw, rng)
        if damaged == raw:
            continue
        target.write_bytes(damaged)
        assert outcome(open_file) == "error", f"case {case}: damaged file loaded"


def open_checkpoint(path: Path, bundle: DataBundle) -> None:
    """What ``kdcli eval`` and ``kdcli distill --teacher`` do with a checkpoint before using it."""
    _, info = model_from_checkpoint(path)
    checkpoint_data_config(info, path, root=None, download=False)
    check_fits(info, bundle, path)


def restore(trainer: Trainer, path: Path) -> None:
    """What ``--resume`` does with a resume state before training on."""
    trainer.restore(load_state(path), path)


# -- structural changes under a valid digest ------------------------------------------------

JSON_FIELDS = ("num_classes", "input_size", "mean", "std", "epoch", "data", "metrics", "config")
BAD_VALUES = {
    "arch": ["", "no_such_model_xyz", "cifar_resnet20", "cifar_wrn_16_1"],
    "num_classes": ["0", "-3", "1.5", '"ten"', "10000000000000", "null", "[10]"],
    "input_size": ['"abc"', "[3, 16]", "[-3, 16, 16]", "[3, 0, 16]", "[3, 100000000, 100000000]", "[1, 16, 16]", "{}"],
    "mean": ["[0.5, 0.5]", '["a", 0, 0]', "[NaN, 0.5, 0.5]", "0.5"],
    "std": ["[0, 1, 1]", "[-1, 1, 1]", "[Infinity, 1, 1]", "[1, 1]"],
    "epoch": ["-1", '"x"', "1e400"],
    "data": ['{"name": 5}', '{"val_split": 7}', '{"unknown_key": 1}', "[]", "[" * 5000 + "]" * 5000],
    "metrics": ['{"top1": "high"}', "[1, 2]"],
    "config": ["[]", '"text"'],
    "format": ["", "kdcli-state", "safetensors"],
    "format_version": ["1", "3", "", "two"],
}


def restructure_checkpoint(tensors: dict[str, torch.Tensor], metadata: dict[str, str], rng: random.Random) -> str:
    """Change one thing a hostile author could change and still sign; returns what it was."""
    kind = rng.choice(["dtype", "shape", "drop", "extra", "rename", "not-json", "bad-value", "missing-field", "no-digest"])
    name = rng.choice(sorted(tensors))
    if kind == "dtype":
        tensors[name] = retype(tensors[name], rng)
    elif kind == "shape":
        tensors[name] = reshape(tensors[name], rng)
    elif kind == "drop":
        del tensors[name]
    elif kind == "extra":
        tensors["extra.weight"] = torch.zeros(3)
    elif kind == "rename":
        tensors[name + "_renamed"] = tensors.pop(name)
    elif kind == "not-json":
        metadata[rng.choice(JSON_FIELDS)] = rng.choice(["{", "[3, 16", "not json", "\x00\xff", "'single'", "1 2"])
    elif kind == "bad-value":
        field = rng.choice(sorted(BAD_VALUES))
        metadata[field] = rng.choice(BAD_VALUES[field])
    elif kind == "missing-field":
        del metadata[rng.choice(["arch", "num_classes", "input_size", "mean", "std", "method", "epoch", "format", "format_version"])]
    return kind


def retype(tensor: torch.Tensor, rng: random.Random) -> torch.Tensor:
    choices = [dtype for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.uint8, torch.float32) if dtype != tensor.dtype]
    return tensor.to(rng.choice(choices))


def reshape(tensor: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same tensor in another shape (never the one it had)."""
    flat = tensor.reshape(-1)
    kind = rng.choice(["unsqueeze", "grow", "shrink", "flatten", "scalar"])
    if kind == "grow":
        changed = torch.cat([flat, flat[:1]]) if tensor.dim() <= 1 else torch.cat([tensor, tensor[:1]])
    elif kind == "shrink" and tensor.numel() > 1:
        changed = flat[:-1] if tensor.dim() <= 1 else tensor[:-1]
    elif kind == "flatten":
        changed = flat if tensor.dim() > 1 else flat.reshape(1, -1)
    elif kind == "scalar" and tensor.numel() > 0:
        changed = flat[0].clone()
    else:
        changed = tensor.unsqueeze(0)
    return changed if changed.shape != tensor.shape else tensor.unsqueeze(0)


def test_restructured_checkpoints_end_in_one_line_errors(source_run: Path, bundle: DataBundle, tmp_path: Path) -> None:
    valid_tensors, valid_metadata = load_tensors(source_run / "last.safetensors", CHECKPOINT_FORMAT, "")
    rng = random.Random("checkpoint-structure")
    target = tmp_path / "restructured.safetensors"
    kinds: dict[str, int] = {}
    for case in range(CASES["checkpoint-structure"]):
        tensors, metadata = dict(valid_tensors), dict(valid_metadata)
        kind = restructure_checkpoint(tensors, metadata, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        (save_unsigned if kind == "no-digest" else save_tensors)(target, tensors, metadata)
        assert outcome(lambda: open_checkpoint(target, bundle)) == "error", f"case {case} ({kind}) loaded"
    assert len(kinds) == 9  # every kind of change was tried


def save_unsigned(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata={key: value for key, value in metadata.items() if key != "sha256"})


def skeleton_nodes(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from skeleton_nodes(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from skeleton_nodes(value, (*path, index))


def replace_at(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = replace_at(node[path[0]], path[1:], value)
    return node


SKELETON_GARBAGE = [None, "x", -1, 10**9, 1.5, True, [], {}, [[1]], {"$tensor": "/no/such/tensor"}, {"$tensor": [1]}, {"$dict": 5}, {"$dict": [[[1], 2]]}, {"$dict": [[1, 2, 3]]}]


def test_restructured_resume_states_end_in_one_line_errors(source_run: Path, trainer: Trainer, tmp_path: Path) -> None:
    valid_tensors, valid_metadata = load_tensors(source_run / "resume.safetensors", STATE_FORMAT, "")
    nodes = list(skeleton_nodes(json.loads(valid_metadata["skeleton"])))
    rng = random.Random("state-structure")
    target = tmp_path / "resume.safetensors"
    outcomes = {"error": 0, "loaded": 0}
    for case in range(CASES["state-structure"]):
        tensors, metadata = dict(valid_tensors), dict(valid_metadata)
        kind = rng.choice(["dtype", "shape", "drop-tensor", "skeleton-node", "skeleton-not-json", "skeleton-deep"])
        name = rng.choice(sorted(tensors))
        if kind == "dtype":
            tensors[name] = retype(tensors[name], rng)
        elif kind == "shape":
            tensors[name] = reshape(tensors[name], rng)
        elif kind == "drop-tensor":
            del tensors[name]
        elif kind == "skeleton-node":
            path, garbage = rng.choice(nodes), rng.choice(SKELETON_GARBAGE)
            kind += f" {garbage!r} at {path}"
            metadata["skeleton"] = json.dumps(replace_at(json.loads(valid_metadata["skeleton"]), path, garbage))
        elif kind == "skeleton-not-json":
            metadata["skeleton"] = valid_metadata["skeleton"][: rng.randrange(len(valid_metadata["skeleton"]))]
        else:
            metadata["skeleton"] = "[" * 100_000 + "]" * 100_000
        save_tensors(target, tensors, metadata)
        result = outcome(lambda: restore(trainer, target))
        if result == "loaded":  # other values in the right structure (a number in a history record, an empty
            train_one_step(trainer)  # optimizer slot): such a state must still train
        outcomes[result] += 1
    assert outcomes["error"] > CASES["state-structure"] * 0.8


def train_one_step(trainer: Trainer) -> None:
    inputs, targets, index = next(trainer.train_loader.batches(1, 0))
    trainer.train_step(Batch(inputs, targets, index, 1))


# -- a handful through the real command line -------------------------------------------------


def test_broken_files_through_the_cli(source_run: Path, tmp_path: Path) -> None:
    checkpoint = (source_run / "last.safetensors").read_bytes()
    flipped = bytearray(checkpoint)
    flipped[len(flipped) // 2] ^= 0x10
    cases = {"truncated.safetensors": checkpoint[: len(checkpoint) // 3], "flipped.safetensors": bytes(flipped), "empty.safetensors": b""}
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        assert_one_line(run_cli("eval", tmp_path / name), 1, name)
        assert_one_line(run_cli("distill", "--teacher", tmp_path / name, "--out", tmp_path / f"student-{name}", *TINY), 1, name)

    tensors, metadata = load_tensors(source_run / "last.safetensors", CHECKPOINT_FORMAT, "")
    save_tensors(tmp_path / "float64.safetensors", {key: value.double() for key, value in tensors.items()}, {**metadata, "input_size": "[3, 16"})
    assert_one_line(run_cli("eval", tmp_path / "float64.safetensors"), 1, "damaged kdcli metadata")

    state_tensors, state_metadata = load_tensors(source_run / "resume.safetensors", STATE_FORMAT, "")
    for label, change in {"shape": lambda t, m: t.update({"/model/conv1.weight": t["/model/conv1.weight"][:1]}), "skeleton": lambda t, m: m.update(skeleton="{")}.items():
        run = tmp_path / f"resume-{label}"
        run.mkdir()
        (run / "config.json").write_bytes((source_run / "config.json").read_bytes())
        tensors_copy, metadata_copy = dict(state_tensors), dict(state_metadata)
        change(tensors_copy, metadata_copy)
        save_tensors(run / "resume.safetensors", tensors_copy, metadata_copy)
        assert_one_line(run_cli("teach", "--resume", run, "-q"), 1, "resume.safetensors")

    garbage_config = tmp_path / "garbage-config"
    garbage_config.mkdir()
    (garbage_config / "config.json").write_bytes(b"\xff\xfe not json")
    assert_one_line(run_cli("teach", "--resume", garbage_config), 2, "config.json")


def assert_one_line(result: Any, code: int, fragment: str) -> None:
    assert result.exit_code == code, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcli: error: ") and fragment in lines[0], result
    assert "Traceback" not in result.stdout + result.stderr


def test_no_code_path_can_unpickle() -> None:
    """kdcli and its built-in methods never call a loader that unpickles.

    The one ``torch.load`` allowed is ``kdcli convert``'s, with ``weights_only=True``
    (tensors and plain containers only; anything else is refused).
    """
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "kdcli").rglob("*.py"), *(root / "plugins").rglob("*.py")]
    assert sources
    for source in sources:
        text = source.read_text()
        for forbidden in ("pickle.load", "np.load(", "numpy.load(", "jit.load(", "import joblib", "import dill"):
            assert forbidden not in text, f"{source} mentions {forbidden}"
        for line in text.splitlines():
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"""')) and "``" not in line:
                assert "weights_only=True" in line, f"{source}: {line.strip()}"
