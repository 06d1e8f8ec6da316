"""``python -m kdcli`` (also what ``torchrun -m kdcli`` runs)."""

from kdcli.cli import main

main()
