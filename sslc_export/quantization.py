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
SCALES = ("mse", "max")
SHRINKS = torch.linspace(1.0, 0.5, 21)  # mse: the fractions of max |value| / qmax tried as each group's scale
SEARCH_ROWS = 4096  # groups searched at once: bounds the search's memory on whole matrices


@dataclass(frozen=True)
class Grid:
    """bits 8: q in [-127, 127]; bits 4: q in [-8, 7]. A group's scale is max|kept| / qmax ("max"), or the
    shrink of it that rounds the group with the least weighted squared error ("mse": clipping the largest
    values a little buys finer steps for all the others, which matters most at 4 bits)."""

    bits: int
    group_size: int
    search: str = "max"

    @property
    def qmax(self) -> int:
        return QMAX[self.bits]

    @property
    def qmin(self) -> int:
        return -QMAX[self.bits] - (self.bits == 4)

    def groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def scales(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, from the values given (the kept ones; zeros elsewhere, which round to 0 at any scale).
        `weights` (one per column) price each column's squared rounding error in the mse search."""
        if not values.shape[1]:
            return values.new_zeros(values.shape[0])
        largest = values.abs().amax(dim=1) / self.qmax
        if self.search == "max":
            return largest
        candidates = largest[:, None] * SHRINKS.to(values)  # [rows, shrinks]
        best = torch.cat([self._least_error(values[rows], candidates[rows], weights)
                          for rows in torch.arange(values.shape[0], device=values.device).split(SEARCH_ROWS)])
        return candidates.gather(1, best[:, None])[:, 0]

    def _least_error(self, values: torch.Tensor, candidates: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Per row, the index of the candidate scale that rounds the row with the least (weighted) squared error."""
        safe = torch.where(candidates > 0, candidates, torch.ones_like(candidates))[:, :, None]
        rounded = torch.clamp(torch.round(values[:, None, :] / safe), self.qmin, self.qmax) * safe
        errors = (rounded - values[:, None, :]).square()
        if weights is not None:
            errors = errors * weights
        return errors.sum(dim=2).argmin(dim=1)  # ties go to the first, the plain max

    def expand(self, scales: torch.Tensor, cols: int) -> torch.Tensor:
        """[rows, groups] -> [rows, cols]: each column's scale."""
        return scales.repeat_interleave(self.group_size, dim=1)[:, :cols]

    def record(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": True, "scales_from": "kept values per group",
                "scales": self.search}


def make_grid(bits: int, group_size: int, scales: str = "max") -> Grid | None:
    """The grid named by --bits/--group-size/--scales, None for fp32; a one-line error for anything else."""
    if bits not in BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size <= 0 or group_size % GROUP_STEP:
        raise UserError(f"--group-size must be a positive multiple of {GROUP_STEP} (the native kernel's step), got {group_size}")
    if scales not in SCALES:
        raise UserError(f"--scales must be one of {', '.join(SCALES)}, got '{scales}'")
    return None if bits == 32 else Grid(bits, group_size, scales)


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


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], flattened, two to a byte (low nibble first, offset by 8): int4 as stored on disk."""
    nibbles = (q.flatten().to(torch.int16) + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """pack_int4's inverse: the first `count` values, int8."""
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).flatten()[:count]
    return (nibbles.to(torch.int16) - 8).to(torch.int8)


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
    groups = padded.reshape(rows, -1, grid.group_size)
    scales = grid.scales(groups.reshape(-1, grid.group_size)).reshape(rows, -1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(weight / grid.expand(safe, cols)), grid.qmin, grid.qmax)
    return Quantized(q.to(torch.int8), scales.float())
