"""``python -m kdcli`` (also what ``torchrun -m kdcli`` runs)."""

from kdcli.launch import main

main()
