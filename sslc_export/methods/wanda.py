"""Wanda: score |W_ij|·‖X_j‖, keep the top share of each output row; no weight update."""
from __future__ import annotations

from sslc_export.methods.base import Method, sparse_only
from sslc_export.patterns import select


class Wanda(Method):
    name = "wanda"

    def decompose(self, weight, stats, budget, pattern, settings):
        mask = select(weight.abs() * stats.column_norms, budget.nnz, pattern)
        return sparse_only(weight * mask, mask)
