"""kdcli-dkd: Decoupled Knowledge Distillation as a kdcli method plugin."""

from kdcli_dkd.dkd import DKD, DKDParams, decoupled_kd_terms, warmup_factor

__all__ = ["DKD", "DKDParams", "decoupled_kd_terms", "warmup_factor"]
