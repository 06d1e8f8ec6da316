"""Names the CLI shows in its help, kept free of heavy imports so ``kdcli --help`` stays fast."""

from __future__ import annotations

# The method a job uses when none is named: the one place this default is written.
DEFAULT_METHODS: dict[str, str] = {"teach": "standard", "distill": "kd"}

# The splits ``kdcli eval`` can score.
EVAL_SPLITS: tuple[str, ...] = ("test", "val", "train")

# The plugin API version (MAJOR.MINOR) this kdcli provides; ``kdcli.method`` re-exports it.
API_VERSION = "3.0"

# The largest training seed (torch's generators take 64-bit seeds); ``--seeds`` checks it before the config loads.
MAX_SEED = 2**63 - 1
