"""OBS pruning with second-order statistics (the SparseGPT update), shared by `sparsegpt`
and the exact-loss variant of `sslc`.

Columns are processed left to right in blocks; each pruned weight's error is pushed onto
the not-yet-processed columns through the inverse Hessian's Cholesky factor.
"""
from __future__ import annotations

import torch

from sslc_export.patterns import Pattern, select


class ObsPruner:
    def __init__(self, gram: torch.Tensor, damp: float, blocksize: int = 128):
        hessian = gram.clone()
        self.dead = hessian.diagonal() == 0  # inputs that never fire carry no information
        hessian[self.dead, self.dead] = 1.0
        hessian += damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], device=hessian.device)
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        self.inverse_factor = torch.linalg.cholesky(inverse, upper=True)
        self.blocksize = blocksize

    def prune(
        self, weight: torch.Tensor, keep: int, pattern: Pattern, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight, keep-mask): all but `keep` entries zeroed, the survivors updated to compensate."""
        work = weight.clone().float()
        keep_mask = torch.zeros_like(work, dtype=torch.bool)
        work[:, self.dead] = 0
        rows, cols = work.shape
        hinv = self.inverse_factor
        blocksize = self.blocksize - self.blocksize % pattern.m if pattern.kind == "nm" else self.blocksize
        for start in range(0, cols, blocksize):
            end = min(start + blocksize, cols)
            block = work[:, start:end].clone()
            hinv_block = hinv[start:end, start:end]
            diag = hinv_block.diagonal()
            block_keep = keep * end // cols - keep * start // cols  # exact total across blocks
            scores = block.square() / diag.square()
            mask = select(scores, block_keep, pattern, None if forced is None else forced[:, start:end])
            keep_mask[:, start:end] = mask
            # Rows of the transposed block are columns of W: each update touches contiguous memory.
            columns = block.T.contiguous()
            errors = torch.empty_like(columns)
            drop_scaled = (~mask).T.to(block.dtype) / diag[:, None]  # error_i = w_i * [pruned] / Hinv_ii
            # Views made once: in this loop per-call overhead, not arithmetic, is the cost.
            column, error, drop, hinv_row = columns.unbind(0), errors.unbind(0), drop_scaled.unbind(0), hinv_block.unbind(0)
            for i in range(end - start):
                torch.mul(column[i], drop[i], out=error[i])
                # Zeroes column i where pruned and pushes its error onto the later columns (hinv_row[i] is 0 before i).
                columns.addr_(hinv_row[i], error[i], alpha=-1)
            work[:, start:end] = columns.T
            errors = errors.T
            work[:, end:] -= errors @ hinv[start:end, end:]
        return work * keep_mask, keep_mask
