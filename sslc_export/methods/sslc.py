"""SSLC: alternate a rank-r SVD and pruning on the residual until the loss plateaus.

diag (the paper): work on Ws = W·D, D = diag(‖X_j‖); L_t = rank-r SVD of (Ws - S_{t-1}),
S_t = the budgeted largest |Ws - L_t| plus the salient top 1 % of |Ws|; undo D at the end.
exact (beyond the paper): the same alternation on the true loss ‖(W - L - S)X‖: the SVD
step is whitened by the Cholesky factor of XᵀX and the sparse step is OBS pruning of the
residual with XᵀX as Hessian.
With --bits (exact loss only) the alternation stays fp32 and one more step quantizes: U and V are
balanced and put on the grid, then the OBS step prunes and quantizes S on W - U_q·V_q in one sweep,
so S also absorbs the low-rank pair's rounding error (`quantized_step`); then S's integers and scales are
refitted on the grid the same way.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from sslc_export import defaults
from sslc_export.calibration import InputStatistics
from sslc_export.errors import UserError
from sslc_export.lowrank import Whitening, balance, empty_factors, randomized_svd
from sslc_export.methods.base import Decomposition, Method, activation_scale, on_grid
from sslc_export.obs import ObsPruner
from sslc_export.patterns import Pattern, select
from sslc_export.quantization import Grid, Quantized, QuantizedFactors, empty_low_rank

LowRankStep = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
SparseStep = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


REFIT_PASSES = 2  # coordinate-descent passes over S per refit round (fp32)
GRID_REFIT_PASSES = 3  # passes over S's integers and scales after the quantized sweep
LOSS_CHECK_EVERY = 4  # the exact loss costs m·n² per check, as much as a third of one iteration


def alternate(
    target: torch.Tensor,
    low_rank_step: LowRankStep,
    sparse_step: SparseStep,
    loss: Callable[[torch.Tensor], float],
    iters: int,
    tol: float,
    svd_first: bool = False,
) -> Decomposition:
    """The SSLC loop, independent of which loss the two steps minimise.

    Starting from S_0 = the pruned target (rather than S_0 = 0, `svd_first`, the paper) gave a lower
    final loss on every SmolLM2 layer tried, for both losses, at no extra cost. The loss is checked every
    LOSS_CHECK_EVERY iterations (and after the last); the loop stops when a check improves on
    the previous one by less than tol per iteration. The iterate returned is the best one checked,
    not the last: the two steps minimise different surrogates, so the loss can rise."""
    sparse = torch.zeros_like(target) if svd_first else sparse_step(target)[0]
    warm = None
    history: list[float] = []
    best: tuple[torch.Tensor, ...] = ()
    for step in range(1, iters + 1):
        u, v, warm = low_rank_step(target - sparse, warm)
        sparse, mask = sparse_step(target - u @ v)
        if step % LOSS_CHECK_EVERY and step < iters:
            continue
        history.append(loss(u @ v + sparse))
        if history[-1] <= min(history):
            best = (u, v, sparse, mask)
        if len(history) > 1 and history[-2] - history[-1] < tol * LOSS_CHECK_EVERY * history[-2]:
            break
    return Decomposition(*best, history, iterations=step)


def refit(target: torch.Tensor, fitted: Decomposition, low_rank_step: LowRankStep,
          refit_sparse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
          loss: Callable[[torch.Tensor], float], rounds: int) -> Decomposition:
    """Rounds of: S's kept values solved on its fixed mask (`refit_sparse(residual, values, mask)`), then L
    refitted to what S leaves. The mask, so the budget, never changes; the best iterate is returned."""
    u, v, sparse, mask = fitted.u, fitted.v, fitted.sparse, fitted.mask
    history = list(fitted.loss_history)
    best, best_loss = fitted, min(history)
    warm = None
    for _ in range(rounds):
        sparse = refit_sparse(target - u @ v, sparse, mask)
        u, v, warm = low_rank_step(target - sparse, warm)
        history.append(loss(u @ v + sparse))
        if history[-1] < best_loss:
            best, best_loss = Decomposition(u, v, sparse, mask), history[-1]
    return replace(best, loss_history=history, iterations=fitted.iterations + rounds)


def quantize_low_rank(u: torch.Tensor, v: torch.Tensor, pruner: ObsPruner, gram: torch.Tensor, damp: float,
                      grid: Grid) -> tuple[Quantized, Quantized]:
    """U and V on the grid, GPTQ-style on the whitened problem: V (grouped along n) against XᵀX (`pruner`, S's own),
    then U (grouped along r) against the Hessian of its own input, V_q·XᵀX·V_qᵀ, so U absorbs V's rounding error."""
    keep_all = Pattern()
    v_q, _ = pruner.prune_quantized(v, v.numel(), keep_all, grid)
    v_dequantized = v_q.dequantize(grid)
    u_q, _ = ObsPruner(v_dequantized @ gram @ v_dequantized.T, damp).prune_quantized(u, u.numel(), keep_all, grid)
    return u_q, v_q


def quantized_step(weight: torch.Tensor, fitted: Decomposition, stats: InputStatistics, pruner: ObsPruner, nnz: int,
                   pattern: Pattern, grid: Grid, damp: float, salient: torch.Tensor | None,
                   refit_passes: int) -> Decomposition:
    """The last step of a quantized decomposition: balanced U, V on the grid, then S pruned and quantized in one
    OBS sweep of W - U_q·V_q, so S absorbs the low-rank rounding error as well as the pruning error, then
    `refit_passes` over S's integers and scales on the sweep's mask."""
    u, v = balance(fitted.u, fitted.v)
    u_q, v_q = quantize_low_rank(u, v, pruner, stats.gram, damp, grid) if u.shape[1] else empty_low_rank(weight, grid)
    target = weight - u_q.dequantize(grid) @ v_q.dequantize(grid)
    sparse_q, mask = pruner.prune_quantized(target, nnz, pattern, grid, salient)
    sparse_q = pruner.refit_quantized(target, sparse_q, mask, grid, refit_passes)
    return on_grid(QuantizedFactors(grid, sparse_q, u_q, v_q), mask, fitted.loss_history, fitted.iterations)


class Sslc(Method):
    name = "sslc"
    quantizes = True
    losses = ("exact", "diag")  # exact first: on SmolLM2 it beat diag by far at equal budget (docs/results.md)
    default_iters = defaults.SSLC_ITERS  # why these counts: docs/results.md

    def rank_ratio(self, settings):
        return settings.rank_ratio

    def resolve(self, settings, pattern):
        if settings.loss is None and pattern.kind == "structured":
            settings = replace(settings, loss="diag")  # the exact sparse step has no structured form
        return super().resolve(settings, pattern)

    def check(self, pattern, settings):
        super().check(pattern, settings)
        if not 0.0 < settings.rank_ratio < 1.0:
            raise UserError(f"--rank-ratio {settings.rank_ratio} leaves no low-rank or no sparse budget: sslc needs 0 < rank ratio < 1")
        if settings.first_step not in ("prune", "svd"):
            raise UserError(f"unknown first step '{settings.first_step}': choose prune or svd")
        if settings.iters is not None and settings.iters < 1:
            raise UserError(f"--iters must be >= 1, got {settings.iters}")
        if settings.refit_rounds < 0:
            raise UserError(f"--refit-rounds must be >= 0, got {settings.refit_rounds}")
        if not 0.0 <= settings.salient_fraction < 1.0:
            raise UserError(f"--salient must be in [0, 1), got {settings.salient_fraction}")
        if settings.loss == "exact" and pattern.kind == "structured":
            raise UserError("--loss exact has no structured sparse step: use --loss diag with --pattern structured")
        if settings.grid is not None and settings.loss != "exact":
            raise UserError(f"--bits {settings.bits} quantizes inside the OBS sweep of --loss exact: use --loss exact")

    def loss_curve(self, weight, stats, budgets, pattern, settings):
        """With the exact loss, one step per budget instead of the whole alternation: the whitened rank-r SVD of W,
        then OBS pruning of what it leaves (one Cholesky factor and one pruner per layer for all budgets). It sees
        what a layer's low-rank part and its sparse part can each do at a fraction of the cost; quantization is
        left out (the pruning error dominates). The diag loss and N:M patterns measure the decomposition itself."""
        if settings.loss != "exact" or pattern.kind == "nm":
            return super().loss_curve(weight, stats, budgets, pattern, settings)
        torch.manual_seed(settings.seed)
        whitening = Whitening(stats.gram, settings.damp)
        pruner = ObsPruner(stats.gram, settings.damp)
        reference = stats.error_energy(weight)
        losses = []
        for budget in budgets:
            u, v = (whitening.low_rank(weight, budget.rank)[:2] if budget.rank else empty_factors(weight))
            low_rank = u @ v
            sparse, _ = pruner.prune(weight - low_rank, budget.nnz, pattern)
            losses.append(stats.relative_error(weight, low_rank + sparse, reference))
        return losses

    def decompose(self, weight, stats, budget, pattern, settings):
        rows, cols = weight.shape
        if budget.nnz <= 0:
            raise UserError(
                f"a {rows}x{cols} layer gets no sparse entries at this --ratio and --rank-ratio: lower --rank-ratio"
            )
        torch.manual_seed(settings.seed)
        scale = activation_scale(stats)
        scaled = weight * scale
        salient = None
        if pattern.kind != "structured" and settings.salient_fraction > 0:
            count = min(math.ceil(settings.salient_fraction * weight.numel()), budget.nnz)
            salient = select(scaled.abs(), count, Pattern(scope="layer"))

        iters = settings.iters if budget.rank else 1  # a layer too small for rank 1 is pruned once

        def no_low_rank(_residual: torch.Tensor, _warm: torch.Tensor | None):
            return *empty_factors(weight), None

        if settings.loss == "exact":
            whitening = Whitening(stats.gram, settings.damp)
            pruner = ObsPruner(stats.gram, settings.damp)
            reference = stats.error_energy(weight)
            grid = settings.grid
            grid_passes = GRID_REFIT_PASSES if settings.refit_rounds else 0
            if grid is not None and not budget.rank:  # nothing to alternate (e.g. --ratio 0): one quantized sweep
                return quantized_step(weight, Decomposition(*empty_factors(weight), weight, weight != 0), stats, pruner,
                                      budget.nnz, pattern, grid, settings.damp, salient, grid_passes)
            low_rank_step = ((lambda residual, warm: whitening.low_rank(residual, budget.rank, warm)) if budget.rank
                             else no_low_rank)

            def loss(approx: torch.Tensor) -> float:
                return stats.relative_error(weight, approx, reference)

            fitted = alternate(
                weight,
                low_rank_step,
                lambda residual: pruner.prune(residual, budget.nnz, pattern, salient),
                loss,
                iters,
                settings.tol,
                settings.first_step == "svd",
            )
            fitted = refit(weight, fitted, low_rank_step,
                           lambda residual, values, mask: pruner.refit(residual, values, mask, REFIT_PASSES),
                           loss, settings.refit_rounds)
            if grid is None:
                return fitted
            return quantized_step(weight, fitted, stats, pruner, budget.nnz, pattern, grid, settings.damp, salient,
                                  grid_passes)

        norm = scaled.norm()

        def prune(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = select(residual.abs(), budget.nnz, pattern, salient)
            return residual * mask, mask

        result = alternate(
            scaled,
            (lambda residual, warm: randomized_svd(residual, budget.rank, warm)) if budget.rank else no_low_rank,
            prune,
            lambda approx: float((scaled - approx).norm() / norm),
            iters,
            settings.tol,
            settings.first_step == "svd",
        )
        result.v = result.v / scale
        result.sparse = result.sparse / scale
        return result
