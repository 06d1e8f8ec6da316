"""Evaluation metrics over a full set of logits: accuracy, NLL, ECE, Brier, distance to p*."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(logits: Tensor, targets: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(targets[:, None]).any(dim=1)
    return hits.float().mean().item()


def negative_log_likelihood(logits: Tensor, targets: Tensor) -> float:
    return F.cross_entropy(logits.float(), targets).item()


def expected_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017), bins closed on the right."""
    confidence, prediction = probs.max(dim=1)
    correct = prediction.eq(targets).float()
    # Inner edges only, right=False: confidence c lands in the bin (lo, hi] holding it.
    edges = torch.linspace(0, 1, num_bins + 1, device=probs.device)
    bins = torch.bucketize(confidence, edges[1:-1], right=False)
    confidence_sum = torch.bincount(bins, weights=confidence, minlength=num_bins)
    correct_sum = torch.bincount(bins, weights=correct, minlength=num_bins)
    return ((confidence_sum - correct_sum).abs().sum() / probs.shape[0]).item()


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over samples of the squared error summed over classes."""
    one_hot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return (probs - one_hot).pow(2).sum(dim=1).mean().item()


def distance_to_true_distribution(probs: Tensor, p_star: Tensor) -> dict[str, float]:
    """Mean total variation and mean squared l2 distance to the true label distribution."""
    difference = probs - p_star
    return {
        "tv": (0.5 * difference.abs().sum(dim=1)).mean().item(),
        "sq_l2": difference.pow(2).sum(dim=1).mean().item(),
    }


def classification_report(logits: Tensor, targets: Tensor) -> dict[str, float]:
    logits = logits.float()
    probs = logits.softmax(dim=1)
    return {
        "top1": topk_accuracy(logits, targets, 1),
        "top5": topk_accuracy(logits, targets, 5),
        "nll": negative_log_likelihood(logits, targets),
        "ece": expected_calibration_error(probs, targets),
        "brier": brier_score(probs, targets),
    }
