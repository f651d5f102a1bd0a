"""Methods on synthetic matrices with planted structure: W = low-rank + sparse, X with uneven column scales."""
import math

import pytest
import torch

from sslc_export.budget import plan_budget
from sslc_export.calibration import InputStatistics
from sslc_export.methods import METHODS, Settings
from sslc_export.patterns import Pattern

M, N, TRUE_RANK = 192, 128, 4


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    inputs = torch.randn(2048, N) * (0.2 + 2 * torch.rand(N))
    stats = InputStatistics(N)
    for batch in inputs.split(512):
        stats.add_batch(batch)
    low_rank = torch.randn(M, TRUE_RANK) @ torch.randn(TRUE_RANK, N) / 3
    sparse = torch.randn(M, N) * (torch.rand(M, N) < 0.15)
    return low_rank + sparse, stats


def decompose(name, weight, stats, ratio=0.5, pattern=Pattern(), **settings):
    method = METHODS[name]
    settings = method.resolve(Settings(**{"rank_ratio": 0.15, **settings}), pattern)
    budget = plan_budget(*weight.shape, ratio, method.rank_ratio(settings), pattern)
    method.check(pattern, settings)
    return method.decompose(weight, stats, budget, pattern, settings), budget


def test_statistics_accumulate_in_batches(planted):
    _, stats = planted
    assert stats.tokens == 2048
    assert torch.allclose(stats.column_norms.square(), stats.gram.diagonal())


@pytest.mark.parametrize("loss", ["diag", "exact"])
def test_sslc_recovers_planted_low_rank_plus_sparse(planted, loss):
    weight, stats = planted
    result, budget = decompose("sslc", weight, stats, loss=loss, iters=100)
    assert result.rank == budget.rank >= TRUE_RANK
    assert int(result.mask.sum()) == budget.nnz
    assert stats.relative_error(weight, result.dense()) < 0.02


@pytest.mark.parametrize("loss", ["diag", "exact"])
def test_sslc_loss_decreases_over_iterations(planted, loss):
    weight, stats = planted
    result, _ = decompose("sslc", weight, stats, loss=loss, iters=15, tol=0.0, refit_rounds=0)
    history = result.loss_history
    assert result.iterations == 15 and len(history) == 4  # checked after iterations 4, 8, 12 and the last
    assert history[-1] < 0.8 * history[0]
    assert all(later <= earlier * 1.001 for earlier, later in zip(history, history[1:]))


def test_alternation_returns_the_best_iterate_not_the_last():
    """The loss is lowest at the check after iteration 4 and rises after: that iterate comes back."""
    from sslc_export.methods.sslc import alternate

    target = torch.zeros(1, 1)
    calls = []

    def low_rank_step(residual, warm):
        calls.append(None)
        return torch.full((1, 1), float(len(calls))), torch.ones(1, 1), None

    result = alternate(target, low_rank_step, lambda residual: (torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)),
                       lambda approx: abs(float(approx) - 4.5), iters=12, tol=0.0)
    assert result.loss_history == [0.5, 3.5] and result.iterations == 8  # stopped at the first check that did not improve
    assert float(result.u) == 4.0


def test_paper_preset_is_the_published_algorithm(planted):
    """--preset paper against the paper's Algorithm 1 written out here: on Ws = W·D, S_0 = 0 and for t = 1..40
    L_t = rank-r randomized SVD of Ws - S_{t-1}, S_t = the per-row largest |Ws - L_t| plus the top 1 % of |Ws|;
    then V·D⁻¹ and S·D⁻¹."""
    from sslc_export.lowrank import randomized_svd
    from sslc_export.patterns import select

    weight, stats = planted
    settings = METHODS["sslc"].resolve(Settings.from_flags("paper", tol=0.0), Pattern())
    assert (settings.loss, settings.first_step, settings.rank_ratio, settings.iters, settings.refit_rounds) == (
        "diag", "svd", 0.25, 40, 0)
    budget = plan_budget(M, N, 0.5, settings.rank_ratio, Pattern())
    result = METHODS["sslc"].decompose(weight, stats, budget, Pattern(), settings)

    torch.manual_seed(settings.seed)
    scale = stats.column_norms
    scaled = weight * scale
    salient = select(scaled.abs(), math.ceil(0.01 * weight.numel()), Pattern(scope="layer"))
    sparse, warm = torch.zeros_like(scaled), None
    for _ in range(40):
        u, v, warm = randomized_svd(scaled - sparse, budget.rank, warm)
        residual = scaled - u @ v
        sparse = residual * select(residual.abs(), budget.nnz, Pattern(), salient)
    torch.testing.assert_close(result.u @ result.v, u @ v / scale)
    torch.testing.assert_close(result.sparse, sparse / scale)
    assert result.iterations == 40


@pytest.mark.parametrize("baseline", ["magnitude", "wanda", "sparsegpt", "svd"])
def test_sslc_beats_single_structure_methods_at_equal_budget(planted, baseline):
    weight, stats = planted
    sslc, sslc_budget = decompose("sslc", weight, stats)
    other, other_budget = decompose(baseline, weight, stats)
    assert sslc_budget.allowed == other_budget.allowed
    kept = lambda r: r.rank * (M + N) + int(r.mask.sum())
    assert kept(sslc) <= sslc_budget.allowed and kept(other) <= other_budget.allowed
    assert stats.relative_error(weight, sslc.dense()) < 0.5 * stats.relative_error(weight, other.dense())


def test_refit_lowers_the_exact_loss_on_the_alternations_mask():
    """The refit rounds re-solve S's values on the mask the alternation chose (same seed, same mask, same budget)
    and refit L: the loss goes down, and each round is in the history."""
    torch.manual_seed(2)
    stats = InputStatistics(N)
    stats.add_batch(torch.randn(4096, N) @ (torch.randn(N, N) / N**0.5 + torch.eye(N)))
    weight = torch.randn(M, N)
    plain, budget = decompose("sslc", weight, stats, loss="exact", iters=8, refit_rounds=0)
    refitted, _ = decompose("sslc", weight, stats, loss="exact", iters=8, refit_rounds=3)
    assert torch.equal(plain.mask, refitted.mask) and int(refitted.mask.sum()) == budget.nnz
    assert refitted.rank == plain.rank
    assert len(refitted.loss_history) == len(plain.loss_history) + 3
    assert stats.relative_error(weight, refitted.dense()) < 0.97 * stats.relative_error(weight, plain.dense())


def test_refit_rounds_0_turns_off_the_grid_refit_too(monkeypatch):
    """--refit-rounds 0 is the algorithm before the refit, with --bits as well: the sweep's integers as they came."""
    from sslc_export.methods import sslc as sslc_module

    torch.manual_seed(3)
    stats = InputStatistics(N)
    stats.add_batch(torch.randn(4096, N) @ (torch.randn(N, N) / N**0.5 + torch.eye(N)))
    weight = torch.randn(M, N)
    calls = []
    original = sslc_module.ObsPruner.refit_quantized

    def counted(self, target, quantized, mask, grid, passes):
        calls.append(passes)
        return original(self, target, quantized, mask, grid, passes)

    monkeypatch.setattr(sslc_module.ObsPruner, "refit_quantized", counted)
    plain, _ = decompose("sslc", weight, stats, loss="exact", iters=4, bits=4, refit_rounds=0)
    refitted, _ = decompose("sslc", weight, stats, loss="exact", iters=4, bits=4, refit_rounds=3)
    assert calls == [0, sslc_module.GRID_REFIT_PASSES]
    assert stats.relative_error(weight, refitted.dense()) < stats.relative_error(weight, plain.dense())


def test_exact_loss_variant_is_not_worse_on_the_true_loss():
    torch.manual_seed(1)
    mixing = torch.randn(N, N) / N**0.5 + torch.eye(N)  # correlated inputs: the diagonal scaling is only an approximation
    stats = InputStatistics(N)
    stats.add_batch(torch.randn(4096, N) @ mixing)
    weight = torch.randn(M, N)
    diag, _ = decompose("sslc", weight, stats, loss="diag", iters=20)
    exact, _ = decompose("sslc", weight, stats, loss="exact", iters=20)
    assert stats.relative_error(weight, exact.dense()) < stats.relative_error(weight, diag.dense())


def test_sparsegpt_beats_magnitude_on_its_own_objective(planted):
    weight, stats = planted
    sgpt, _ = decompose("sparsegpt", weight, stats, ratio=0.7)
    mag, _ = decompose("magnitude", weight, stats, ratio=0.7)
    assert stats.relative_error(weight, sgpt.dense()) < stats.relative_error(weight, mag.dense())


@pytest.mark.parametrize("name", ["sslc", "wanda", "magnitude", "sparsegpt"])
def test_nm_pattern_is_respected(planted, name):
    weight, stats = planted
    pattern = Pattern(kind="nm", n=2, m=4)
    result, _ = decompose(name, weight, stats, ratio=0.4, pattern=pattern)
    assert (result.mask.reshape(M, N // 4, 4).sum(-1) == 2).all()
    assert (result.sparse[~result.mask] == 0).all()


def test_structured_sslc_keeps_whole_columns(planted):
    weight, stats = planted
    result, budget = decompose("sslc", weight, stats, pattern=Pattern(kind="structured"))
    kept_columns = result.mask.all(0)
    assert int(kept_columns.sum()) * M == budget.nnz == int(result.mask.sum())
    assert (result.sparse[:, ~kept_columns] == 0).all()


def test_salient_weights_survive(planted):
    weight, stats = planted
    scaled = (weight * stats.column_norms).abs()
    top = scaled.flatten().topk(int(0.01 * weight.numel())).indices
    result, _ = decompose("sslc", weight, stats, iters=5)
    assert result.mask.flatten()[top].all()


@pytest.mark.parametrize("loss", ["diag", "exact"])
def test_salient_weights_in_heavy_rows_all_survive(planted, loss):
    """The top 1 % of |W·D| concentrated in two rows (246 entries, over twice their share of ~55 each): all
    kept, and the budget still spent exactly."""
    weight, stats = planted
    weight = weight.clone()
    weight[5:7] += 100.0
    scaled = (weight * stats.column_norms).abs()
    salient = scaled.flatten().topk(math.ceil(0.01 * weight.numel())).indices
    assert ((salient // N == 5) | (salient // N == 6)).all()
    result, budget = decompose("sslc", weight, stats, loss=loss, iters=5)
    assert result.mask.flatten()[salient].all()
    assert int(result.mask.sum()) == budget.nnz


def test_balanced_factors_keep_the_product_and_equalise_norms():
    from sslc_export.lowrank import balance

    torch.manual_seed(0)
    u = torch.randn(40, 6) * torch.tensor([100.0, 30.0, 10.0, 3.0, 1.0, 0.1])  # singular values in U, as the SVD step leaves them
    v = torch.linalg.qr(torch.randn(30, 6)).Q.T
    balanced_u, balanced_v = balance(u, v)
    torch.testing.assert_close(balanced_u @ balanced_v, u @ v, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(balanced_u.norm(dim=0), balanced_v.norm(dim=1))
    spread = balanced_u.norm(dim=0).max() / balanced_u.norm(dim=0).min()
    assert spread < (u.norm(dim=0).max() / u.norm(dim=0).min()).sqrt() * 1.5
