"""Linear probe: how linearly separable frozen student features are (the unsupervised metric).

Features of the train images (eval view) are standardized and a multinomial
logistic regression is fitted by full-batch L-BFGS with a small L2 penalty;
val accuracy is then read from the fitted probe. Deterministic for given features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
              iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a probe on (N, D) features; returns (mean, std, weight (C, D), bias (C,))."""
    features = features.double()
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, weight.detach(), bias.detach()


def probe_logits(probe: tuple, features: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of a fitted probe on new features (N, D)."""
    mean, std, weight, bias = probe
    return ((features.double() - mean) / std) @ weight.T + bias
