"""kdcli: a command-line toolkit for knowledge distillation."""

from kdcli.errors import KdcliError, UsageError

__version__ = "0.1.0"

__all__ = ["KdcliError", "UsageError", "__version__"]
