"""The one interface every method implements: a weight, its input statistics and a budget in,
a low-rank pair plus a sparse matrix out. Methods never see the model or the block loop."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch

from sslc_export import defaults
from sslc_export.budget import Budget
from sslc_export.calibration import InputStatistics
from sslc_export.errors import UserError
from sslc_export.lowrank import empty_factors
from sslc_export.patterns import Pattern
from sslc_export.quantization import Grid, QuantizedFactors, make_grid

LOSSES = ("diag", "exact")
MAX_DAMP = 1.0  # beyond the mean diagonal the damping outweighs the statistics it regularises


@dataclass(frozen=True)
class Settings:
    """Knobs shared by all methods; each method reads the ones it needs."""

    rank_ratio: float = defaults.RANK_RATIO  # share of the kept budget spent on U, V (sslc)
    iters: int | None = None  # alternating iterations (sslc); None: the method's default for its loss
    salient_fraction: float = defaults.SALIENT_FRACTION  # top |W·D| entries always kept in S (sslc)
    loss: str | None = None  # diag: activation-scaled W; exact: whitened by XᵀX with OBS pruning; None: method's first
    tol: float = defaults.TOL  # stop when one iteration improves the loss by less than this fraction
    damp: float = defaults.DAMP  # Gram damping, as a fraction of its mean diagonal
    seed: int = defaults.SEED
    bits: int = defaults.BITS  # 8 or 4: S, U and V end on an integer grid chosen inside the decomposition
    group_size: int = defaults.GROUP_SIZE  # input columns per quantization scale
    scales: str = defaults.SCALES  # each group's scale: mse (searched) | max (max |kept| / qmax)
    refit_rounds: int = defaults.REFIT_ROUNDS  # sslc, exact loss: rounds of S solved on its mask, then L refitted
    first_step: str = "prune"  # sslc: S_0 = the pruned target ("prune"), or 0 so the SVD step comes first ("svd", the paper)

    @classmethod
    def from_flags(cls, preset: str | None = None, **flags) -> Settings:
        """Settings from command-line flags: a preset (defaults.PRESETS) fills those left unset (None), the defaults the rest."""
        if preset is not None and preset not in defaults.PRESETS:
            raise UserError(f"unknown --preset '{preset}': choose one of {', '.join(defaults.PRESETS)}")
        given = {name: value for name, value in flags.items() if value is not None}
        return cls(**{**defaults.PRESETS.get(preset, {}), **given})

    def record(self) -> dict:
        """What a checkpoint's fingerprint keeps: every field, but first_step, scales and refit_rounds only where they change
        the result from what checkpoints made before them did, so those still match."""
        record = asdict(self)
        if self.first_step == "prune":
            del record["first_step"]
        if self.refit_rounds == 0 or self.loss == "diag":
            del record["refit_rounds"]
        if self.bits == 32 or self.scales == "max":
            del record["scales"]
        return record

    @property
    def grid(self) -> Grid | None:
        return make_grid(self.bits, self.group_size, self.scales)


@dataclass
class Decomposition:
    """W ≈ U·V + S; S is held dense here (zeros outside `mask`), stored compactly on disk."""

    u: torch.Tensor  # m x r
    v: torch.Tensor  # r x n
    sparse: torch.Tensor  # m x n
    mask: torch.Tensor  # m x n bool
    loss_history: list[float] = field(default_factory=list)  # the method's objective, where it checked it
    iterations: int = 1
    quantized: QuantizedFactors | None = None  # with --bits: the stored integers; u, v and sparse are their dequantized values
    factor_masks: tuple[torch.Tensor, torch.Tensor] | None = None  # supports of U and V when they are block-sparse (hss)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def params(self) -> int:
        """Parameters stored: S's kept entries plus U's and V's (all of them, or their supports when block-sparse)."""
        return int(self.mask.sum()) + factor_params(self.u, self.v, self.factor_masks)

    def dense(self) -> torch.Tensor:
        return self.sparse + self.u @ self.v


class Method(ABC):
    name: ClassVar[str]
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm", "structured")  # the first: what a run without --pattern gets
    losses: ClassVar[tuple[str, ...]] = ("diag",)
    quantizes: ClassVar[bool] = False  # whether --bits 8|4 is built into the method's sweep

    default_iters: ClassVar[dict[str, int]] = {}

    def resolve(self, settings: Settings, pattern: Pattern) -> Settings:
        """Fill the settings left to the method (loss, iterations) so manifests record what ran."""
        loss = settings.loss or self.losses[0]
        iters = settings.iters if settings.iters is not None else self.default_iters.get(loss, 1)
        return replace(settings, loss=loss, iters=iters)

    def rank_ratio(self, settings: Settings) -> float:
        """Share of the budget given to the low-rank pair: 0 for pruning-only methods."""
        return 0.0

    def check(self, pattern: Pattern, settings: Settings) -> None:
        if pattern.kind not in self.patterns:
            raise UserError(f"method {self.name} does not support --pattern {pattern.kind}: use one of {', '.join(self.patterns)}")
        if settings.grid is not None and not self.quantizes:
            raise UserError(f"method {self.name} has no --bits {settings.bits}: quantization runs inside the OBS sweep of "
                            "sslc (--loss exact) and sparsegpt, or rounds to nearest with magnitude; use one of those")
        if not 0 < settings.damp <= MAX_DAMP:
            raise UserError(f"--damp must be in (0, {MAX_DAMP}] (a fraction of the Gram's mean diagonal added to it), got {settings.damp}")
        if settings.loss is None:
            return
        if settings.loss not in LOSSES:
            raise UserError(f"unknown --loss '{settings.loss}': choose one of {', '.join(LOSSES)}")
        if settings.loss not in self.losses:
            raise UserError(f"method {self.name} has no --loss {settings.loss}: use one of {', '.join(self.losses)}")

    def check_budget(self, budget: Budget) -> None:
        """Refuse, before any work, a layer budget the method cannot use (plan_budget has checked the common limits)."""

    @abstractmethod
    def decompose(
        self, weight: torch.Tensor, stats: InputStatistics, budget: Budget, pattern: Pattern, settings: Settings
    ) -> Decomposition: ...

    def loss_curve(
        self, weight: torch.Tensor, stats: InputStatistics, budgets: list[Budget], pattern: Pattern, settings: Settings
    ) -> list[float]:
        """Relative calibration loss at each budget, which --allocation global splits the model's budget by: here the
        decomposition itself; a method whose decomposition is slow measures a cheaper step of it instead."""
        reference = stats.error_energy(weight)
        return [stats.relative_error(weight, self.decompose(weight, stats, budget, pattern, settings).dense(), reference)
                for budget in budgets]


def factor_params(u: torch.Tensor, v: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None) -> int:
    """What a low-rank pair costs in the budget: r·(m + n), or the entries of its supports when block-sparse."""
    if masks is None:
        return u.numel() + v.numel()
    return int(masks[0].sum()) + int(masks[1].sum())


def sparse_only(sparse: torch.Tensor, mask: torch.Tensor) -> Decomposition:
    return Decomposition(*empty_factors(sparse), sparse, mask)


def on_grid(factors: QuantizedFactors, mask: torch.Tensor, loss_history: list[float] | None = None, iterations: int = 1) -> Decomposition:
    """The decomposition a quantized method returns: the integers, and beside them the values they stand for."""
    grid = factors.grid
    return Decomposition(factors.u.dequantize(grid), factors.v.dequantize(grid), factors.sparse.dequantize(grid), mask,
                         loss_history or [], iterations, factors)


def activation_scale(stats: InputStatistics) -> torch.Tensor:
    """d_j = ‖X_j‖; inputs that never fire get 1 so that undoing the scale stays finite."""
    norms = stats.column_norms
    return torch.where(norms > 0, norms, torch.ones_like(norms))
