"""SparseGPT: OBS pruning with the Hessian XᵀX, updating surviving weights to compensate."""
from __future__ import annotations

from sslc_export.methods.base import Method, sparse_only
from sslc_export.obs import ObsPruner


class SparseGpt(Method):
    name = "sparsegpt"
    patterns = ("unstructured", "nm")

    def decompose(self, weight, stats, budget, pattern, settings):
        pruned, mask = ObsPruner(stats.gram, settings.damp).prune(weight, budget.nnz, pattern)
        return sparse_only(pruned, mask)
