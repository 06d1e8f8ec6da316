"""Memory estimates checked before a data set is allocated, so a size that cannot fit fails with numbers, not an OOM."""

from __future__ import annotations

import os
from pathlib import Path

from kdcli.errors import UsageError

GIB = 2**30


def available_bytes() -> int:
    """Memory the kernel could give this process now (MemAvailable), else all physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(what: str, needed: int, settings: str) -> None:
    """Refuse ``what`` when its estimated ``needed`` bytes exceed what is available; ``settings`` names the sizes."""
    available = available_bytes()
    if needed > available:
        raise UsageError(
            f"{what} would need about {needed / GIB:.1f} GiB of memory, {available / GIB:.1f} GiB is available; "
            f"lower {settings}"
        )
