"""Integers inside the decomposition (`compress --bits 8|4`): a symmetric grid with one scale per
(row, group of input columns), the convention of the sparse-rows operator (sslc_export/sparse_rows.py).

The integers and scales chosen here are what the checkpoint stores and what every quantized export
writes unchanged, so the model that was fitted is exactly the model that ships.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sslc_export.errors import UserError
from sslc_export.sparse_rows import QMAX

BITS = (32, 8, 4)
GROUP_STEP = 16  # the native kernel walks groups in whole 16-column steps


@dataclass(frozen=True)
class Grid:
    """bits 8: q in [-127, 127], scale = max|kept| / 127; bits 4: q in [-8, 7], scale = max|kept| / 7."""

    bits: int
    group_size: int

    @property
    def qmax(self) -> int:
        return QMAX[self.bits]

    @property
    def qmin(self) -> int:
        return -QMAX[self.bits] - (self.bits == 4)

    def groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def scales(self, values: torch.Tensor) -> torch.Tensor:
        """Per row, from the values given (the kept ones; zeros elsewhere): max |value| / qmax."""
        return values.abs().amax(dim=1) / self.qmax if values.shape[1] else values.new_zeros(values.shape[0])

    def expand(self, scales: torch.Tensor, cols: int) -> torch.Tensor:
        """[rows, groups] -> [rows, cols]: each column's scale."""
        return scales.repeat_interleave(self.group_size, dim=1)[:, :cols]

    def record(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": True, "scales_from": "kept values per group"}


def make_grid(bits: int, group_size: int) -> Grid | None:
    """The grid named by --bits/--group-size, None for fp32; a one-line error for anything else."""
    if bits not in BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size <= 0 or group_size % GROUP_STEP:
        raise UserError(f"--group-size must be a positive multiple of {GROUP_STEP} (the native kernel's step), got {group_size}")
    return None if bits == 32 else Grid(bits, group_size)


@dataclass
class Quantized:
    """One matrix on a grid: integers q (int8, [rows, cols], 0 where not kept) and scales (fp32, [rows, groups])."""

    q: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, grid: Grid) -> torch.Tensor:
        return self.q.float() * grid.expand(self.scales, self.q.shape[1])


    def to(self, device: torch.device | str) -> Quantized:
        return Quantized(self.q.to(device), self.scales.to(device))


@dataclass
class QuantizedFactors:
    """S, U and V of one Linear as stored integers; V is grouped along its n input columns, U along its r."""

    grid: Grid
    sparse: Quantized
    u: Quantized
    v: Quantized

    def to(self, device: torch.device | str) -> QuantizedFactors:
        return QuantizedFactors(self.grid, self.sparse.to(device), self.u.to(device), self.v.to(device))


def empty_low_rank(like: torch.Tensor, grid: Grid) -> tuple[Quantized, Quantized]:
    """Rank-0 U (m x 0) and V (0 x n) on the grid, for layers with no low-rank pair."""
    rows, cols = like.shape
    return (Quantized(torch.zeros(rows, 0, dtype=torch.int8, device=like.device), like.new_zeros(rows, 0)),
            Quantized(torch.zeros(0, cols, dtype=torch.int8, device=like.device), like.new_zeros(0, grid.groups(cols))))


def round_to_nearest(weight: torch.Tensor, grid: Grid) -> Quantized:
    """Every entry kept, each group's scale from its own values: the post-hoc quantizer (no error feedback)."""
    rows, cols = weight.shape
    padded = weight.new_zeros(rows, grid.groups(cols) * grid.group_size)
    padded[:, :cols] = weight
    scales = padded.reshape(rows, -1, grid.group_size).abs().amax(dim=2) / grid.qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(weight / grid.expand(safe, cols)), grid.qmin, grid.qmax)
    return Quantized(q.to(torch.int8), scales.float())
