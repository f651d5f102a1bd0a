"""The SVD step: rank-r approximations, plain (on a pre-scaled matrix) or whitened by XᵀX."""
from __future__ import annotations

import torch


def randomized_svd(
    matrix: torch.Tensor, rank: int, warm_start: torch.Tensor | None = None, oversample: int = 8, power_iters: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-style randomized SVD: returns (U·Σ, Vᵀ, right basis to warm-start the next call).

    In an alternating loop the matrix changes little between calls, so starting the range
    finder from the previous right singular vectors needs one power pass instead of several.
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    if warm_start is None:
        probe = torch.randn(cols, width, dtype=matrix.dtype, device=matrix.device)
    else:
        probe, power_iters = warm_start, 1
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    left, sigma, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    u = (basis @ left[:, :rank]) * sigma[:rank]
    return u, right_t[:rank], right_t.T.contiguous()


def empty_factors(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-0 factors for a matrix shaped and placed like `like`."""
    rows, cols = like.shape
    return like.new_zeros(rows, 0), like.new_zeros(0, cols)


class Whitening:
    """Cholesky factor C of the damped Gram G = XᵀX + λI, so ‖E X‖ = ‖E C‖.

    Low-rank regression in the whitened space is then a plain truncated SVD
    (the closed form of SVD-LLM and HASSLE-free).
    """

    def __init__(self, gram: torch.Tensor, damp: float):
        damped = gram + damp * gram.diagonal().mean().clamp_min(1e-8) * torch.eye(gram.shape[0], device=gram.device)
        self.factor = torch.linalg.cholesky(damped)

    def low_rank(
        self, target: torch.Tensor, rank: int, warm_start: torch.Tensor | None = None, power_iters: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """argmin over rank-r L of ‖(target - L) C‖, as factors (U, V) plus a warm start."""
        u, v_white, basis = randomized_svd(target @ self.factor, rank, warm_start, power_iters=power_iters)
        v = torch.linalg.solve_triangular(self.factor, v_white, upper=False, left=False)
        return u, v, basis


def balance(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 term so U's column and V's row have equal norms; U·V is unchanged.

    The SVD step leaves the singular values in U, so one row of U spans σ_1..σ_r; block-wise
    quantization (MatMulNBits) then rounds the small-σ terms to zero. Balanced, each factor
    spans only √(σ_1/σ_r)."""
    scale = (v.norm(dim=1) / u.norm(dim=0).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return u * scale, v / scale[:, None]
