"""Magnitude pruning: keep the largest |W|. The data-free floor every method must beat.
With --bits the kept values are rounded to nearest on the grid (no error feedback): at --ratio 0, plain
round-to-nearest quantization of the dense model, the baseline GPTQ-style quantizers must beat."""
from __future__ import annotations

from sslc_export.methods.base import Method, on_grid, sparse_only
from sslc_export.patterns import select
from sslc_export.quantization import QuantizedFactors, empty_low_rank, round_to_nearest


class Magnitude(Method):
    name = "magnitude"
    quantizes = True

    def decompose(self, weight, stats, budget, pattern, settings):
        mask = select(weight.abs(), budget.nnz, pattern)
        grid = settings.grid
        if grid is None:
            return sparse_only(weight * mask, mask)
        return on_grid(QuantizedFactors(grid, round_to_nearest(weight * mask, grid), *empty_low_rank(weight, grid)), mask)
