"""LoSparse (Li et al., 2023): W ≈ U·V + S with S pruned structurally (whole input columns or output rows kept,
`--pattern structured --axis`), so S exports as a smaller dense MatMul (the `structured` ONNX layout).

U·V starts as the activation-aware rank-r SVD of W, as `svd` computes it (whitened by XᵀX for --loss exact,
scaled by D = diag(‖X_j‖) for diag), and S as the whole residual W - U·V. Then `iters` short training steps
(Adam on U, V and S) under LoSparse's cubic schedule: the number of S's lines kept falls from all to the
budget's as k + (all - k)·(1 - t/T_p)³ over the first T_p steps, and the last FINAL_SHARE of the steps train at
the final mask (the paper's final warm-up). At each step the kept lines with the lowest smoothed importance are
pruned, for good: a pruned line stays zero.

The paper trains the whole model on its task loss. Inside the block walk only this Linear's inputs are at hand,
so the training objective is the layer-local reconstruction ‖(W - U·V - S)X‖² / ‖WX‖², computed from XᵀX: every
calibration token at every step (full batch); with --loss diag from ‖X_j‖² alone, which is cheap per step.

Importance: LoSparse scores an entry θ of S by |θ·∂L/∂θ|, the first-order estimate of the loss change when θ is
zeroed, smoothed over steps by a moving average (β1). Training here starts at an exact fit, where the gradient is
zero, so the estimate gets its second-order term, exact for this quadratic loss up to the off-diagonal of XᵀX:
I_ij = G_jj·θ_ij² - θ_ij·∂L/∂θ_ij (G = XᵀX / ‖WX‖²). A line scores the sum over its entries (LoSparse's "sum";
for columns it is exactly the loss change of removing the column). PLATON's uncertainty factor is left out:
full-batch gradients have no sampling noise for it to measure.

After the last step the kept lines of S are refit in closed form given U·V (least squares on the same loss), and
that refit is kept only if it lowers the loss, so the result does not hang on how far Adam got.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from sslc_export import defaults
from sslc_export.errors import UserError
from sslc_export.lowrank import Whitening, balance, empty_factors, randomized_svd
from sslc_export.methods.base import Decomposition, Method, activation_scale

POWER_ITERS = 6  # the initial SVD is computed once: as `svd` does, spend power iterations on accuracy
FINAL_SHARE = 0.25  # share of the steps trained at the final mask
BETA = 0.85  # importance smoothing (LoSparse's and PLATON's β1)
CURVE_STEPS = 16  # --allocation global: training steps per point of a loss curve (see `loss_curve`)
LEARNING_RATE = 0.05  # Adam's step size for each tensor, as a fraction of its RMS at the start (synthetic layers: larger
# steps lowered the loss a little further; this one stays well inside the range where every step size tried helped)


def cubic_keep(step: int, prune_steps: int, lines: int, final: int) -> int:
    """Lines of S kept after `step` (0-based): the cubic fall from `lines` to `final` over `prune_steps` steps."""
    done = min(step + 1, prune_steps) / prune_steps
    return final + math.ceil((lines - final) * (1.0 - done) ** 3)


class LoSparse(Method):
    name = "losparse"
    patterns = ("structured",)
    losses = ("exact", "diag")
    default_iters = defaults.LOSPARSE_STEPS

    def rank_ratio(self, settings):
        return settings.rank_ratio

    def check(self, pattern, settings):
        super().check(pattern, settings)
        if not 0.0 < settings.rank_ratio < 1.0:
            raise UserError(f"--rank-ratio {settings.rank_ratio} leaves no low-rank or no sparse budget: losparse needs "
                            "0 < rank ratio < 1")
        if settings.iters is not None and settings.iters < 1:
            raise UserError(f"--iters must be >= 1, got {settings.iters}")

    def loss_curve(self, weight, stats, budgets, pattern, settings):
        """Each point trained for at most CURVE_STEPS steps instead of --iters: the split compares layers' curves, and
        on synthetic layers a quarter of the default steps lost only a few percent of relative loss at every budget
        tried, for a quarter of the time."""
        return super().loss_curve(weight, stats, budgets, pattern, replace(settings, iters=min(settings.iters, CURVE_STEPS)))

    def decompose(self, weight, stats, budget, pattern, settings):
        torch.manual_seed(settings.seed)
        exact = settings.loss == "exact"
        gram = stats.gram.to(weight.device)
        curvature = gram.diagonal()

        def product(error: torch.Tensor) -> torch.Tensor:
            """E·XᵀX (diag: E·diag(‖X_j‖²))."""
            return error @ gram if exact else error * curvature

        reference = float((product(weight) * weight).sum().clamp_min(1e-30))
        u, v = self._initial_factors(weight, stats, budget.rank, settings)
        columns = pattern.axis == "columns"
        line_sum = 0 if columns else 1  # the dimension summed over to score a line
        lines, line_length = (weight.shape[1], weight.shape[0]) if columns else weight.shape
        final = budget.nnz // line_length
        alive = torch.ones(lines, dtype=torch.bool, device=weight.device)

        def kept_lines() -> torch.Tensor:
            """The alive lines as a mask that broadcasts against S."""
            return alive[None, :] if columns else alive[:, None]

        sparse = weight - u @ v
        factors = [tensor for tensor in (u, v) if tensor.numel()]
        optimizer = torch.optim.Adam([{"params": [tensor], "lr": LEARNING_RATE * float(tensor.square().mean().sqrt())}
                                      for tensor in (*factors, sparse)])
        score = torch.zeros(lines, device=weight.device)
        prune_steps = max(1, math.ceil((1.0 - FINAL_SHARE) * settings.iters))
        history: list[float] = []
        for step in range(settings.iters):
            error = weight - u @ v - sparse
            scaled = product(error) / reference  # -∂L/∂S / 2 for L = ‖EX‖² / ‖WX‖²
            history.append(math.sqrt(max(float((scaled * error).sum()), 0.0)))
            importance = (sparse.square() * (curvature / reference) + 2 * sparse * scaled).sum(line_sum)
            score = BETA * score + (1 - BETA) * importance
            if u.numel():
                u.grad, v.grad = -2 * scaled @ v.T, -2 * u.T @ scaled
            sparse.grad = -2 * scaled * kept_lines()
            optimizer.step()
            excess = int(alive.sum()) - cubic_keep(step, prune_steps, lines, final)
            if excess > 0:
                ranked = torch.where(alive, score, torch.full_like(score, float("inf")))
                alive[torch.topk(ranked, excess, largest=False).indices] = False
            sparse.mul_(kept_lines())
        mask = kept_lines().expand(weight.shape).clone()
        sparse = self._refit(weight - u @ v, sparse, mask, alive, columns, product, gram, settings.damp if exact else None)
        error = weight - u @ v - sparse
        history.append(math.sqrt(max(float((product(error) * error).sum()) / reference, 0.0)))
        return Decomposition(u, v, sparse, mask, history, settings.iters)

    @staticmethod
    def _initial_factors(weight: torch.Tensor, stats, rank: int, settings) -> tuple[torch.Tensor, torch.Tensor]:
        """The `svd` method's rank-r factors, balanced so that one relative step size suits both."""
        if not rank:
            return empty_factors(weight)
        if settings.loss == "exact":
            u, v, _ = Whitening(stats.gram.to(weight.device), settings.damp).low_rank(weight, rank, power_iters=POWER_ITERS)
        else:
            scale = activation_scale(stats).to(weight.device)
            u, v, _ = randomized_svd(weight * scale, rank, power_iters=POWER_ITERS)
            v = v / scale
        return balance(u, v)

    @staticmethod
    def _refit(residual, trained, mask, alive, columns, product, gram, damp):
        """S's kept lines at their least-squares optimum given U·V: kept rows take the residual's rows (rows do not
        interact); kept columns K take R·G[:, K]·G[K, K]⁻¹ (exact loss, G damped as the SVD's whitening is) or R[:, K]
        (diag). Returned only if it lowers the loss."""
        refit = residual * mask
        if columns and damp is not None and bool(alive.any()):
            kept = alive.nonzero().squeeze(1)
            block = gram[kept][:, kept]
            block = block + damp * gram.diagonal().mean().clamp_min(1e-8) * torch.eye(len(kept), device=gram.device)
            refit = torch.zeros_like(residual)
            refit[:, kept] = torch.linalg.solve(block, (residual @ gram[:, kept]).T).T

        def loss(sparse: torch.Tensor) -> float:
            error = residual - sparse
            return float((product(error) * error).sum())

        return refit.contiguous() if loss(refit) <= loss(trained) else (trained * mask).contiguous()
