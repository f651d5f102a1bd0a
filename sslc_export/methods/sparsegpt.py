"""SparseGPT: OBS pruning with the Hessian XᵀX, updating surviving weights to compensate.
With --bits the same sweep quantizes the survivors (joint sparsification and quantization; GPTQ at --ratio 0)."""
from __future__ import annotations

from sslc_export.methods.base import Method, on_grid, sparse_only
from sslc_export.obs import ObsPruner
from sslc_export.quantization import QuantizedFactors, empty_low_rank


class SparseGpt(Method):
    name = "sparsegpt"
    patterns = ("unstructured", "nm")
    quantizes = True

    def decompose(self, weight, stats, budget, pattern, settings):
        pruner = ObsPruner(stats.gram, settings.damp)
        grid = settings.grid
        if grid is None:
            return sparse_only(*pruner.prune(weight, budget.nnz, pattern))
        sparse_q, mask = pruner.prune_quantized(weight, budget.nnz, pattern, grid)
        return on_grid(QuantizedFactors(grid, sparse_q, *empty_low_rank(weight, grid)), mask)
