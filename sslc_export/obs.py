"""OBS pruning with second-order statistics (the SparseGPT update), shared by `sparsegpt`
and the exact-loss variant of `sslc`.

Columns are processed left to right in blocks; each pruned weight's error is pushed onto
the not-yet-processed columns through the inverse Hessian's Cholesky factor. With a grid
(compress --bits) the sweep also quantizes, as SparseGPT does for joint sparsification and
quantization: each block's mask is chosen first, then every column is rounded in order (kept
entries to q·scale, pruned ones to 0) and its whole error is pushed on; a group's scales are
taken when the sweep reaches its first column, from the group's kept values as updated so far.
With every entry kept this is GPTQ.

The sweep is greedy: each entry is settled once, knowing only the errors of the columns before it. `refit`
and `refit_quantized` then solve for the kept values on the fixed mask by coordinate descent on the same
damped quadratic (one exact minimisation per entry, every pass sweeping all columns), which lowers the loss
well below the sweep's (docs/results.md, "Refitting S on its mask").
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sslc_export.patterns import Pattern, select
from sslc_export.quantization import Grid, Quantized


class ObsPruner:
    def __init__(self, gram: torch.Tensor, damp: float, blocksize: int = 128):
        hessian = gram.clone()
        self.dead = hessian.diagonal() == 0  # inputs that never fire carry no information
        hessian[self.dead, self.dead] = 1.0
        hessian += damp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], device=hessian.device)
        self.hessian = hessian
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        self.inverse_factor = torch.linalg.cholesky(inverse, upper=True)
        self.blocksize = blocksize

    def prune(
        self, weight: torch.Tensor, keep: int, pattern: Pattern, forced: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pruned weight, keep-mask): all but `keep` entries zeroed, the survivors updated to compensate."""
        work, keep_mask, _ = self._sweep(weight, keep, pattern, forced, None)
        return work * keep_mask, keep_mask

    def prune_quantized(
        self, weight: torch.Tensor, keep: int, pattern: Pattern, grid: Grid, forced: torch.Tensor | None = None
    ) -> tuple[Quantized, torch.Tensor]:
        """(integers and scales, keep-mask): pruned as `prune` does, the survivors on `grid` (0 where pruned)."""
        _, keep_mask, quantized = self._sweep(weight, keep, pattern, forced, grid)
        return quantized, keep_mask

    def refit(self, target: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, passes: int) -> torch.Tensor:
        """S's kept values re-solved on `mask` against (target - S)·H·(target - S)ᵀ; starts from `values`."""
        sparse = values.clone().float()
        gradient = (target - sparse) @ self.hessian
        for _ in range(passes):
            self._descend(sparse, gradient, mask, lambda column, best: best)
        return sparse

    def refit_quantized(self, target: torch.Tensor, quantized: Quantized, mask: torch.Tensor, grid: Grid,
                        passes: int) -> Quantized:
        """`refit` on the grid: each pass re-rounds every kept entry to its best integer with the others fixed,
        then moves each group's scale to its least-squares value for the integers chosen."""
        if passes == 0:
            return quantized
        q, scales = quantized.q.float(), quantized.scales.clone()
        sparse = q * grid.expand(scales, q.shape[1])
        gradient = (target - sparse) @ self.hessian
        for _ in range(passes):
            step = grid.expand(scales, q.shape[1])
            inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))

            def on_grid(column: int, best: torch.Tensor) -> torch.Tensor:
                q[:, column] = (best * inverse[:, column]).round_().clamp_(grid.qmin, grid.qmax)
                return q[:, column] * step[:, column]

            self._descend(sparse, gradient, mask, on_grid)
            self._refit_scales(sparse, gradient, q, scales, grid)
        return Quantized(q.to(torch.int8), scales)

    def _descend(self, sparse: torch.Tensor, gradient: torch.Tensor, mask: torch.Tensor,
                 project: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        """One coordinate-descent pass over the columns, in place: each kept entry moves to its exact minimiser
        given all the others (`project` puts it where it may go), pruned ones stay 0. `gradient` is (T - S)·H,
        kept current inside a block column by column and for the other columns once per block (GPTQ's lazy batch)."""
        rows, cols = sparse.shape
        diag = self.hessian.diagonal()
        keep = mask.to(sparse.dtype)
        for start in range(0, cols, self.blocksize):
            end = min(start + self.blocksize, cols)
            block_gradient = gradient[:, start:end].clone()
            changes = sparse.new_zeros(end - start, rows)
            hessian_rows = self.hessian[start:end, start:end].unbind(0)
            for i, column in enumerate(range(start, end)):
                best = sparse[:, column] + block_gradient[:, i] / diag[column]
                moved = project(column, best * keep[:, column])
                torch.sub(moved, sparse[:, column], out=changes[i])
                sparse[:, column] = moved
                block_gradient.addr_(changes[i], hessian_rows[i], alpha=-1)
            gradient.sub_(changes.T @ self.hessian[start:end])

    def _refit_scales(self, sparse: torch.Tensor, gradient: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                      grid: Grid) -> None:
        """Each group's scale moved to its least-squares value for its integers (never below 0), in place."""
        for group in range(scales.shape[1]):
            start, end = group * grid.group_size, min((group + 1) * grid.group_size, q.shape[1])
            integers = q[:, start:end]
            curvature = ((integers @ self.hessian[start:end, start:end]) * integers).sum(dim=1)
            change = (gradient[:, start:end] * integers).sum(dim=1) / curvature.clamp_min(1e-30)
            change = torch.where(curvature > 0, change, torch.zeros_like(change)).clamp_min(-scales[:, group])
            scales[:, group] += change
            moved = integers * change[:, None]
            sparse[:, start:end] += moved
            gradient.sub_(moved @ self.hessian[start:end])

    def _blocksize(self, pattern: Pattern, grid: Grid | None) -> int:
        """Blocks hold whole N:M runs and whole quantization groups, so a group's scales see its final mask."""
        unit = math.lcm(pattern.m if pattern.kind == "nm" else 1, grid.group_size if grid else 1)
        return max(unit, self.blocksize - self.blocksize % unit)

    def _sweep(
        self, weight: torch.Tensor, keep: int, pattern: Pattern, forced: torch.Tensor | None, grid: Grid | None
    ) -> tuple[torch.Tensor, torch.Tensor, Quantized | None]:
        work = weight.clone().float()
        keep_mask = torch.zeros_like(work, dtype=torch.bool)
        work[:, self.dead] = 0
        rows, cols = work.shape
        hinv = self.inverse_factor
        blocksize = self._blocksize(pattern, grid)
        quantized = None
        if grid is not None:
            quantized = Quantized(torch.zeros(rows, cols, dtype=torch.int8, device=work.device),
                                  work.new_zeros(rows, grid.groups(cols)))
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
            if grid is None:
                errors = self._prune_columns(columns, mask, hinv_block)
            else:
                errors = self._quantize_columns(columns, mask, hinv_block, grid, quantized, start)
            work[:, start:end] = columns.T
            errors = errors.T
            work[:, end:] -= errors @ hinv[start:end, end:]
        return work, keep_mask, quantized

    @staticmethod
    def _prune_columns(columns: torch.Tensor, mask: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        """Zero the pruned entries of each column in turn, pushing their errors onto the later columns."""
        errors = torch.empty_like(columns)
        drop_scaled = (~mask).T.to(columns.dtype) / hinv_block.diagonal()[:, None]  # error_i = w_i * [pruned] / Hinv_ii
        # Views made once: in this loop per-call overhead, not arithmetic, is the cost.
        column, error, drop, hinv_row = columns.unbind(0), errors.unbind(0), drop_scaled.unbind(0), hinv_block.unbind(0)
        for i in range(columns.shape[0]):
            torch.mul(column[i], drop[i], out=error[i])
            # Zeroes column i where pruned and pushes its error onto the later columns (hinv_row[i] is 0 before i).
            columns.addr_(hinv_row[i], error[i], alpha=-1)
        return errors

    @staticmethod
    def _quantize_columns(columns: torch.Tensor, mask: torch.Tensor, hinv_block: torch.Tensor, grid: Grid,
                          quantized: Quantized, start: int) -> torch.Tensor:
        """Round each column in turn (kept entries onto the grid, pruned ones to 0), pushing the errors on;
        the integers and scales go into `quantized` (block columns start at `start`, a group boundary)."""
        errors = torch.empty_like(columns)
        kept = mask.T.to(columns.dtype)
        q_block = torch.empty_like(columns)
        rounded = torch.empty_like(columns[0])
        diag = hinv_block.diagonal()
        column, error, keep_row, q_row, hinv_row = (columns.unbind(0), errors.unbind(0), kept.unbind(0), q_block.unbind(0),
                                                     hinv_block.unbind(0))
        for i in range(columns.shape[0]):
            if i % grid.group_size == 0:  # the group's scales from its kept values, as updated so far
                scale = grid.scales((columns[i:i + grid.group_size] * kept[i:i + grid.group_size]).T,
                                    diag[i:i + grid.group_size].square().reciprocal())  # the OBS price of each column's error
                quantized.scales[:, (start + i) // grid.group_size] = scale
                inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # an all-zero group stays 0
            torch.mul(column[i], inverse, out=q_row[i]).round_().clamp_(grid.qmin, grid.qmax).mul_(keep_row[i])
            torch.mul(q_row[i], scale, out=rounded)
            torch.sub(column[i], rounded, out=error[i]).div_(diag[i])
            columns.addr_(hinv_row[i], error[i], alpha=-1)  # column i becomes exactly its rounded value (up to fp32)
        quantized.q[:, start:start + columns.shape[0]] = q_block.T.to(torch.int8)
        return errors
