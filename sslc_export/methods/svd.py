"""Activation-aware truncated SVD, low-rank only: the whole budget goes to U and V.

diag: SVD of W·D (D = column norms of X), then V·D⁻¹. exact: SVD of W·C with C the
Cholesky factor of XᵀX (SVD-LLM), the optimum of ‖(W - UV)X‖ at rank r.
"""
from __future__ import annotations

import torch

from sslc_export.lowrank import Whitening, randomized_svd
from sslc_export.methods.base import Decomposition, Method, activation_scale

POWER_ITERS = 6  # a single decomposition: spend iterations on accuracy, not warm starts


class Svd(Method):
    name = "svd"
    patterns = ("unstructured",)
    losses = ("exact", "diag")

    def rank_ratio(self, settings):
        return 1.0

    def decompose(self, weight, stats, budget, pattern, settings):
        torch.manual_seed(settings.seed)
        if settings.loss == "exact":
            u, v, _ = Whitening(stats.gram, settings.damp).low_rank(weight, budget.rank, power_iters=POWER_ITERS)
        else:
            scale = activation_scale(stats)
            u, v, _ = randomized_svd(weight * scale, budget.rank, power_iters=POWER_ITERS)
            v = v / scale
        empty = torch.zeros_like(weight)
        return Decomposition(u, v, empty, empty.bool())
