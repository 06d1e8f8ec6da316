"""Pretrained timm weights from the Hugging Face Hub: the local cache first, the network only when allowed, in bounded time.

timm left alone goes to the network for every pretrained model, retries, and
waits on a server that never answers.  Here the weights file is resolved
first: from the cache without a request; then, unless ``HF_HUB_OFFLINE`` is
set or the caller forbids it (``--dry-run``), with a short timeout on the one
request that finds the file.  timm then loads the local file.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import RemoteEntryNotFoundError
from torch import nn

from kdcli.errors import KdcliError, first_line, one_line

# Seconds for the request that locates a file (connect and first answer), and for each read of its body.
HUB_TIMEOUT_S = 5.0
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # the names timm looks for, safest first
HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"


class WeightsUnavailable(KdcliError):
    """A pretrained model's files are neither in the cache nor reachable: says what to fetch and where it goes."""


def hub_allowed() -> bool:
    """False when the user set ``HF_HUB_OFFLINE``."""
    return not constants.is_offline_mode()


def create_pretrained(name: str, *, network: bool) -> nn.Module:
    """``timm.create_model(name, pretrained=True)`` with its weights resolved here, within bounded time.

    ``network``: the Hub may be asked when the cache lacks a file (and ``HF_HUB_OFFLINE`` is not set).
    """
    network = network and hub_allowed()
    with quiet_libraries():
        if name.startswith(LOCAL_PREFIX):
            return timm.create_model(name, pretrained=True)
        if name.startswith(HUB_PREFIX):
            repo, revision = _split_revision(name.removeprefix(HUB_PREFIX))
            _hub_file(repo, revision, ("config.json",), network=network, model=name)
            folder = _hub_file(repo, revision, WEIGHTS_FILES, network=network, model=name).parent
            return timm.create_model(f"{LOCAL_PREFIX}{folder}", pretrained=True)
        config = timm.models.get_pretrained_cfg(name)
        if config is None or not config.hf_hub_id:  # unknown names (timm's error names them) and URL-only weights
            _require_url_weights(name, "" if config is None else config.url, network=network)
            with _socket_timeout(HUB_TIMEOUT_S):
                return timm.create_model(name, pretrained=True)
        repo, revision = _split_revision(config.hf_hub_id)
        files = (config.hf_hub_filename,) if config.hf_hub_filename else WEIGHTS_FILES
        weights = _hub_file(repo, revision, files, network=network, model=name)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)})


def _hub_file(repo: str, revision: str | None, names: Sequence[str], *, network: bool, model: str) -> Path:
    """The first of ``names`` in Hub repo ``repo``: from the cache, else (``network``) downloaded into it."""
    for filename in names:
        # Not hf_hub_download(local_files_only=True): it builds request headers, and those fetch a registry from the Hub.
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    if not network:
        why = "HF_HUB_OFFLINE is set" if not hub_allowed() else "a dry run does not use the network"
        raise WeightsUnavailable(_missing(model, repo, names, why))
    for filename in names:
        try:  # one request, not retried: huggingface_hub retries a failed lookup for minutes with 60 s timeouts
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=HUB_TIMEOUT_S)
        except RemoteEntryNotFoundError:  # the Hub answered: this repo has no such file, try the next name
            continue
        except Exception as exc:  # no answer (refused, timed out, no network), unknown repo, gated, HTTP errors
            raise WeightsUnavailable(_missing(model, repo, names, f"the Hub at {constants.ENDPOINT} failed: {_reason(exc)}")) from None
        return Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=HUB_TIMEOUT_S))
    raise WeightsUnavailable(f"the Hub repo {repo} has none of {', '.join(names)}; timm teacher {model} cannot be loaded")


def _require_url_weights(model: str, url: str | None, *, network: bool) -> None:
    """Weights only at a URL (no Hub repo) go to torch's hub cache: without the network they must be there already."""
    if network or not url:
        return
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
    if not cached.is_file():
        raise WeightsUnavailable(
            f"the pretrained timm teacher {model} is not in torch's hub cache ({cached}); fetch {url} into it "
            "where the network is reachable, or give timm:local-dir:PATH"
        )


def _reason(exc: BaseException) -> str:
    """A library exception in a few words: its type and first line (the request's URL is in the message)."""
    return f"{type(exc).__name__}: {one_line(first_line(exc), 160)}"


def _missing(model: str, repo: str, names: Sequence[str], why: str) -> str:
    return (
        f"the pretrained timm teacher {model} is not in the Hugging Face cache ({why}); fetch it where the network is "
        f"reachable with `hf download {repo} {names[0]}` (into {constants.HF_HUB_CACHE}, or set HF_HOME) "
        f"or give timm:local-dir:PATH, a folder with config.json and {WEIGHTS_FILES[0]}"
    )


def _split_revision(repo: str) -> tuple[str, str | None]:
    name, _, revision = repo.partition("@")
    return name, revision or None


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No library warnings or log lines on the terminal while weights are found: kdcli reports failures itself."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "timm", "httpx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """timm downloads URL-only weights with urllib, which waits forever on a silent server without a default timeout."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
