"""How the model-wide budget is split over layers (compress --allocation).

uniform: every layer keeps floor((1 - c) * m * n) parameters. global: the same total, floor((1 - c) * Σ m * n),
goes where it costs the model least. Compression is sequential (block i is calibrated on the outputs of the
compressed blocks before it), so the split is chosen before anything is committed: a first pass over the dense
model measures each layer's loss curve (its method's relative calibration loss ‖(W − Ŵ)X‖ / ‖WX‖ at a few kept
fractions within --min-keep/--max-keep, from the statistics the block walk gathers anyway); each curve is reduced
to its lower convex hull, and the budget goes to the steepest hull segments of all layers first (the greedy
solution of the fractional knapsack, optimal on convex curves; at most one layer ends between two measured points).
The objective is Σ over layers of weight · relative loss², the weight being what an output error of that layer
costs the next-token loss (sslc_export/sensitivity.py, one backward pass of the dense model): the unweighted sum,
scale-free but blind to what a layer's error does downstream, lowered the mean relative loss on SmolLM2 and raised
perplexity (docs/results.md).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from sslc_export import defaults
from sslc_export.budget import Budget, split_budget
from sslc_export.calibration import InputStatistics
from sslc_export.errors import UserError
from sslc_export.methods import Method, Settings
from sslc_export.patterns import Pattern

MODES = ("uniform", "global")
OBJECTIVE = "relative loss² weighted by output sensitivity"  # recorded: a checkpoint split by another objective never matches
CURVE_OFFSETS = (-0.3, -0.15, 0.0, 0.15)  # kept fractions measured around 1 - c, besides the two bounds


@dataclass(frozen=True)
class Allocation:
    mode: str = defaults.ALLOCATION
    min_keep: float = defaults.MIN_KEEP  # bounds on each layer's kept fraction (global only)
    max_keep: float = defaults.MAX_KEEP

    def check(self, ratio: float, streaming: bool = False) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown --allocation '{self.mode}': choose one of {', '.join(MODES)}")
        if self.mode == "global" and streaming:
            raise UserError("--allocation global weighs each layer by a backward pass of the whole model, which --streaming "
                            "does not hold in memory: use one or the other")
        if self.mode == "global" and not 0.0 < self.min_keep <= 1.0 - ratio <= self.max_keep < 1.0:
            raise UserError(f"--allocation global needs 0 < --min-keep <= 1 - ratio <= --max-keep < 1 (the bounds on each "
                            f"layer's kept fraction must hold the average); got {self.min_keep} <= {1.0 - ratio:g} <= {self.max_keep}")

    def record(self) -> dict | None:
        """What the fingerprint and manifest keep: nothing for uniform, so checkpoints made before this option still match."""
        return {**asdict(self), "objective": OBJECTIVE} if self.mode != "uniform" else None

    def keeps(self, ratio: float) -> list[float]:
        """The kept fractions a layer's loss curve is measured at."""
        target = 1.0 - ratio
        inner = (round(target + offset, 6) for offset in CURVE_OFFSETS)
        return sorted({self.min_keep, self.max_keep, *(keep for keep in inner if self.min_keep < keep < self.max_keep)})


@dataclass
class LossCurve:
    """One layer's measured points: parameters it may keep, and its relative calibration loss there; `weight` is
    what relative loss² costs the model at this layer (1 until the sensitivity pass sets it)."""

    shape: tuple[int, int]
    kept: list[int]
    losses: list[float]
    weight: float = 1.0

    def record(self) -> dict:
        return {"kept": self.kept, "relative_loss": [round(loss, 6) for loss in self.losses], "weight": float(f"{self.weight:.6g}")}


def measure_curve(method: Method, weight: torch.Tensor, stats: InputStatistics, ratio: float, allocation: Allocation,
                  pattern: Pattern, settings: Settings) -> LossCurve:
    """The layer's loss at each of `allocation.keeps(ratio)` that its pattern allows (an N:M S alone may keep more)."""
    m, n = weight.shape
    budgets: list[Budget] = []
    for keep in allocation.keeps(ratio):
        try:
            budgets.append(split_budget(m, n, math.floor(keep * m * n), method.rank_ratio(settings), pattern))
        except UserError:
            continue
    if not budgets:
        raise UserError(f"no kept fraction in [--min-keep, --max-keep] fits a {m}x{n} layer with this --pattern: widen the bounds")
    return LossCurve((m, n), [budget.allowed for budget in budgets], method.loss_curve(weight, stats, budgets, pattern, settings))


def _hull_segments(curve: LossCurve) -> list[tuple[float, int, int]]:
    """(loss saved per parameter, start, end) along the lower convex hull of (kept, weight · relative loss²)."""
    hull: list[tuple[int, float]] = []
    for point in sorted(zip(curve.kept, (curve.weight * loss**2 for loss in curve.losses))):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) > 0:  # hull[-1] lies strictly below the chord: keep it
                break
            hull.pop()
        hull.append(point)
    return [((y1 - y2) / (x2 - x1), x1, x2) for (x1, y1), (x2, y2) in zip(hull, hull[1:]) if x2 > x1]


def allocate(curves: dict[str, LossCurve], budget: int) -> dict[str, int]:
    """Parameters each layer may keep: every layer starts at its lowest measured point, then the budget left goes to
    the hull segments that save the most loss per parameter, the last one taken in part, so the total is `budget`
    (less only when every layer reaches its upper bound, or no segment lowers the loss any more)."""
    kept = {name: min(curve.kept) for name, curve in curves.items()}
    left = budget - sum(kept.values())
    if left < 0:
        raise UserError(f"the layers' lower bounds alone keep {sum(kept.values()):,} parameters, more than the budget of "
                        f"{budget:,}: lower --min-keep")
    segments = sorted(((rate, start, name, end - start) for name, curve in curves.items()
                       for rate, start, end in _hull_segments(curve)), key=lambda s: (-s[0], s[2], s[1]))
    for rate, _, name, length in segments:
        if left == 0 or rate <= 0:
            break
        step = min(length, left)
        kept[name] += step
        left -= step
    return kept


def allocation_report(curves: dict[str, LossCurve], kept: dict[str, int], budget: int, allocation: Allocation) -> dict:
    """The manifest's record of a global split: the bounds, the budget, and each layer's measured curve."""
    return {**asdict(allocation), "budget": budget, "kept": sum(kept.values()), "layers": kept,
            "curves": {name: curve.record() for name, curve in curves.items()}}


def ratio_table(layers: list[dict]) -> tuple[list[str], list[list]]:
    """A manifest's per-layer ratios (fraction removed) as one row per block and one column per Linear, then a row
    of each column's overall ratio: a split at a glance (the ratios follow from each layer's params_allowed, so
    checkpoints made before layers recorded their ratio read the same)."""
    cells: dict[int, dict[str, str]] = {}
    totals: dict[str, list[int]] = {}
    for layer in layers:
        match = re.fullmatch(r".*\.(\d+)\.(?:.*\.)?([^.]+)", layer["name"])
        if match is None:
            continue
        index, column = int(match.group(1)), match.group(2)
        cells.setdefault(index, {})[column] = f"{1 - layer['params_allowed'] / layer['params_total']:.2f}"
        total = totals.setdefault(column, [0, 0])
        total[0] += layer["params_allowed"]
        total[1] += layer["params_total"]
    columns = list(totals)
    rows: list[list] = [[index, *(row.get(column, "") for column in columns)] for index, row in sorted(cells.items())]
    rows.append(["all", *(f"{1 - allowed / total:.2f}" for allowed, total in totals.values())])
    return ["block", *columns], rows
