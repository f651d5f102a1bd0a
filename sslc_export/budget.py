"""Ratio -> rank and nnz per layer, with the low-rank factors counted inside the budget.

A layer W (m x n) compressed at ratio c may keep floor((1 - c) * m * n) parameters.
A rank-r pair U (m x r), V (r x n) costs r * (m + n); S gets what is left, shaped by the
pattern (N:M fixes S's size and U, V get the rest; structured S is whole columns or rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from sslc_export.errors import UserError
from sslc_export.patterns import Pattern


@dataclass(frozen=True)
class Budget:
    out_features: int
    in_features: int
    rank: int
    nnz: int  # entries of S that may be non-zero
    allowed: int  # floor((1 - c) * m * n)

    @property
    def params_total(self) -> int:
        return self.out_features * self.in_features

    @property
    def params_kept(self) -> int:
        return self.rank * (self.out_features + self.in_features) + self.nnz


def check_ratio(ratio: float, quantized: bool = False) -> None:
    """0 < ratio < 1; a quantized run may also take 0 (nothing removed: a quantized dense model)."""
    if quantized and ratio == 0:
        return
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio < 1.0):
        hint = " (--ratio 0 needs --bits 8 or 4: a quantized dense model)" if ratio == 0 else ""
        raise UserError(f"--ratio must be a number strictly between 0 and 1 (fraction of parameters removed), got {ratio}{hint}")


def plan_budget(out_features: int, in_features: int, ratio: float, rank_ratio: float, pattern: Pattern) -> Budget:
    """rank_ratio is the share of the kept budget given to U and V: 0 = pruning only, 1 = low-rank only.
    Ratio 0 (allowed for quantized runs) keeps every entry in S and no low-rank pair."""
    check_ratio(ratio, quantized=True)
    if not 0.0 <= rank_ratio <= 1.0:
        raise UserError(f"--rank-ratio must be in [0, 1], got {rank_ratio}")
    m, n = out_features, in_features
    if ratio == 0:
        return Budget(m, n, 0, m * n, m * n)
    return split_budget(m, n, math.floor((1.0 - ratio) * m * n), rank_ratio, pattern, ratio)


def split_budget(out_features: int, in_features: int, allowed: int, rank_ratio: float, pattern: Pattern,
                 ratio: float | None = None) -> Budget:
    """`allowed` parameters (a layer's share of a global budget, or its uniform one) split between U, V and S.
    `ratio` only words the error message of an N:M pattern that does not fit."""
    m, n = out_features, in_features
    ratio = 1.0 - allowed / (m * n) if ratio is None else ratio
    rank = min(math.floor(rank_ratio * allowed / (m + n)), min(m, n))
    if pattern.kind == "nm":
        if n % pattern.m:
            raise UserError(f"--nm {pattern.n}:{pattern.m} needs in_features divisible by {pattern.m}; a layer has {n}")
        nnz = m * n * pattern.n // pattern.m
        if nnz > allowed:
            raise UserError(
                f"--ratio {ratio} keeps {allowed / (m * n):.0%} of each layer but an {pattern.n}:{pattern.m} S alone keeps "
                f"{pattern.n / pattern.m:.0%}: use --ratio <= {1 - pattern.n / pattern.m:.2f} or a sparser N:M"
            )
        # N:M fixes S's size, so whatever it leaves goes to U, V (rank_ratio only switches the low-rank part on).
        rank = min((allowed - nnz) // (m + n), m, n) if rank_ratio > 0 else 0
        if rank_ratio > 0 and rank == 0:  # would silently be plain N:M pruning
            largest = math.floor(100 * (1 - pattern.n / pattern.m - (m + n) / (m * n))) / 100
            raise UserError(
                f"--ratio {ratio} with --nm {pattern.n}:{pattern.m} leaves a {m}x{n} layer no parameters for U, V (S alone "
                f"keeps {pattern.n / pattern.m:.0%}): use --ratio <= {largest:.2f}, or a pruning method (sparsegpt, wanda)"
            )
        return Budget(m, n, rank, nnz, allowed)
    if rank_ratio == 1.0:
        return Budget(m, n, rank, 0, allowed)  # low-rank only: the rounding remainder stays unused
    left = allowed - rank * (m + n)
    if pattern.kind == "structured":
        line = m if pattern.axis == "columns" else n
        left = (left // line) * line
    return Budget(m, n, rank, left, allowed)
