"""Magnitude pruning: keep the largest |W|. The data-free floor every method must beat."""
from __future__ import annotations

from sslc_export.methods.base import Method, sparse_only
from sslc_export.patterns import select


class Magnitude(Method):
    name = "magnitude"

    def decompose(self, weight, stats, budget, pattern, settings):
        mask = select(weight.abs(), budget.nnz, pattern)
        return sparse_only(weight * mask, mask)
