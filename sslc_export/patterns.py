"""Sparsity patterns for S: which entries may stay non-zero.

`select` turns a score matrix into a keep-mask holding exactly the budgeted number of
entries, so every method spends the same budget the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sslc_export.errors import UserError

PATTERN_KINDS = ("unstructured", "nm", "structured")


@dataclass(frozen=True)
class Pattern:
    kind: Literal["unstructured", "nm", "structured"] = "unstructured"
    scope: Literal["row", "layer"] = "row"  # unstructured: equal share per output row, or one pool per matrix
    n: int = 2  # nm: keep n of every m consecutive weights along the input dimension
    m: int = 4
    axis: Literal["columns", "rows"] = "columns"  # structured: keep whole input columns or output rows

    @classmethod
    def parse(cls, kind: str, nm: str = "2:4", scope: str = "row", axis: str = "columns") -> "Pattern":
        if kind not in PATTERN_KINDS:
            raise UserError(f"unknown pattern '{kind}': choose one of {', '.join(PATTERN_KINDS)}")
        if scope not in ("row", "layer"):
            raise UserError(f"unknown prune scope '{scope}': choose row or layer")
        if axis not in ("columns", "rows"):
            raise UserError(f"unknown structured axis '{axis}': choose columns or rows")
        try:
            n, m = (int(part) for part in nm.split(":"))
        except ValueError:
            raise UserError(f"--nm must look like N:M (e.g. 2:4), got '{nm}'") from None
        if not 0 < n < m:
            raise UserError(f"--nm {nm}: need 0 < N < M")
        return cls(kind, scope, n, m, axis)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "nm":
            return f"nm {self.n}:{self.m}"
        if self.kind == "structured":
            return f"structured ({self.axis})"
        return f"unstructured (per {self.scope})"


def _top_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Exactly `count` entries: an equal share per row, the remainder to the rows whose next entry scores highest."""
    rows, cols = scores.shape
    share, extra = divmod(count, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    top = torch.topk(scores, min(share + 1, cols), dim=1)
    mask.scatter_(1, top.indices[:, :share], True)
    if extra:
        lucky = torch.topk(top.values[:, share], extra).indices
        mask[lucky, top.indices[lucky, share]] = True
    return mask


def _top_overall(scores: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), count).indices] = True
    return mask.view_as(scores)


def _top_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)


def _top_lines(scores: torch.Tensor, count: int, axis: str) -> torch.Tensor:
    """Whole columns (or rows) ranked by their squared-score energy."""
    dim = 0 if axis == "columns" else 1
    line_length = scores.shape[dim]
    energy = scores.square().sum(dim)
    keep = torch.topk(energy, count // line_length).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if axis == "columns":
        mask[:, keep] = True
    else:
        mask[keep, :] = True
    return mask


def select(scores: torch.Tensor, count: int, pattern: Pattern, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of exactly `count` entries, the highest scores under `pattern`; `forced` entries (salient
    weights) are kept first.

    Unstructured: forced entries sit outside the per-row quota (the rest of the count is shared out as
    usual), so a row holding many of them keeps them all. N:M: a group still keeps N, forced ones first
    (more would break the pattern the exports rely on). Structured patterns keep whole lines: `forced`
    is ignored.
    """
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if forced is not None and pattern.kind == "unstructured":
        return _with_forced(scores, count, pattern, forced)
    if forced is not None and pattern.kind == "nm":
        scores = scores.masked_fill(forced, float("inf"))
    if pattern.kind == "nm":
        return _top_n_of_m(scores, pattern.n, pattern.m)
    if pattern.kind == "structured":
        return _top_lines(scores, count, pattern.axis)
    if pattern.scope == "layer":
        return _top_overall(scores, count)
    return _top_per_row(scores, count)


def _with_forced(scores: torch.Tensor, count: int, pattern: Pattern, forced: torch.Tensor) -> torch.Tensor:
    """Every forced entry (the highest-scoring ones if they alone exceed `count`), then the rest of the count."""
    forced_count = int(forced.sum())
    if forced_count >= count:
        return _top_overall(scores.masked_fill(~forced, float("-inf")), count)
    unforced = scores.masked_fill(forced, float("-inf"))
    mask = forced | select(unforced, count - forced_count, pattern)
    short = count - int(mask.sum())  # a row nearly all forced can leave its share with nothing to take
    if short:
        mask |= _top_overall(unforced.masked_fill(mask, float("-inf")), short)
    return mask
