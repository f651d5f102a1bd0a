import math

import pytest
import torch

from sslc_export.budget import check_ratio, plan_budget
from sslc_export.errors import UserError
from sslc_export.patterns import Pattern, select

ODD_SHAPES = [(7, 13), (13, 7), (1, 9), (97, 31), (64, 192)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("rank_ratio", [0.0, 0.15, 0.5])
def test_unstructured_budget_is_exact(shape, ratio, rank_ratio):
    m, n = shape
    budget = plan_budget(m, n, ratio, rank_ratio, Pattern())
    allowed = math.floor((1 - ratio) * m * n)
    assert budget.allowed == allowed
    assert budget.rank == min(math.floor(rank_ratio * allowed / (m + n)), m, n)
    assert budget.params_kept == allowed  # the sparse part takes every parameter the rank leaves
    scores = torch.rand(m, n)
    mask = select(scores, budget.nnz, Pattern())
    assert int(mask.sum()) == budget.nnz
    layer_mask = select(scores, budget.nnz, Pattern(scope="layer"))
    assert int(layer_mask.sum()) == budget.nnz


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_per_row_share_differs_by_at_most_one(shape):
    m, n = shape
    count = (m * n) // 3 + 1
    per_row = select(torch.rand(m, n), count, Pattern()).sum(1)
    assert int(per_row.sum()) == count
    assert int(per_row.max() - per_row.min()) <= 1


def test_low_rank_only_budget_leaves_no_sparse_part():
    budget = plan_budget(97, 31, 0.5, 1.0, Pattern())
    assert budget.nnz == 0
    assert budget.rank == math.floor(0.5 * 97 * 31 / 128)
    assert budget.params_kept <= budget.allowed


@pytest.mark.parametrize("axis", ["columns", "rows"])
def test_structured_budget_keeps_whole_lines(axis):
    m, n = 48, 80
    pattern = Pattern(kind="structured", axis=axis)
    budget = plan_budget(m, n, 0.5, 0.15, pattern)
    line = m if axis == "columns" else n
    assert budget.nnz % line == 0
    assert budget.params_kept <= budget.allowed < budget.params_kept + line
    mask = select(torch.rand(m, n), budget.nnz, pattern)
    assert int(mask.sum()) == budget.nnz
    kept_lines = mask.all(0) if axis == "columns" else mask.all(1)
    assert int(kept_lines.sum()) * line == budget.nnz


def test_nm_budget_and_mask():
    pattern = Pattern(kind="nm", n=2, m=4)
    budget = plan_budget(16, 32, 0.4, 0.15, pattern)
    assert budget.nnz == 16 * 32 // 2
    assert budget.params_kept <= budget.allowed < budget.params_kept + 16 + 32  # the low-rank pair takes the rest
    assert plan_budget(16, 32, 0.4, 0.0, pattern).rank == 0  # pruning-only methods get no U, V
    mask = select(torch.rand(16, 32), budget.nnz, pattern)
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()


def test_nm_rejects_a_ratio_it_cannot_meet():
    with pytest.raises(UserError, match="ratio <= 0.50"):
        plan_budget(16, 32, 0.6, 0.0, Pattern(kind="nm"))


def test_nm_with_no_room_for_the_low_rank_pair_is_refused():
    """At --ratio 0.5 a 2:4 S takes the whole budget: sslc would silently be N:M pruning."""
    with pytest.raises(UserError, match=r"no parameters for U, V .* use --ratio <= 0\.46"):
        plan_budget(64, 64, 0.5, 0.1, Pattern(kind="nm"))
    assert plan_budget(64, 64, 0.46, 0.1, Pattern(kind="nm")).rank == 1  # the bound the message gives
    assert plan_budget(64, 64, 0.5, 0.0, Pattern(kind="nm")).rank == 0  # pruning-only methods: nothing lost


def test_forced_entries_are_kept():
    scores = torch.rand(20, 30)
    forced = torch.zeros(20, 30, dtype=torch.bool)
    forced[3, 4] = forced[10, 29] = True
    scores[forced] = 0.0  # would be pruned on score alone
    mask = select(scores, 100, Pattern(), forced)
    assert mask[forced].all() and int(mask.sum()) == 100


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_forced_entries_beyond_a_rows_share_are_all_kept(scope):
    """One row holds 25 forced entries, five times its share of 5: all kept, the budget still exact."""
    scores = torch.rand(20, 30)
    forced = torch.zeros(20, 30, dtype=torch.bool)
    forced[7, :25] = True
    scores[forced] = 0.0
    mask = select(scores, 100, Pattern(scope=scope), forced)
    assert mask[forced].all() and int(mask.sum()) == 100
    if scope == "row":  # the other rows share what is left equally
        others = torch.cat([mask[:7], mask[8:]]).sum(1)
        assert int(others.max() - others.min()) <= 1


def test_forced_entries_that_fill_rows_or_the_budget():
    scores = torch.rand(10, 12)
    forced = torch.zeros(10, 12, dtype=torch.bool)
    forced[:2] = True  # two whole rows: their share of the rest has nothing left to take
    mask = select(scores, 60, Pattern(), forced)
    assert mask[forced].all() and int(mask.sum()) == 60
    mask = select(scores, 20, Pattern(), forced)  # more forced entries than the budget: the best of them
    assert int(mask.sum()) == 20 and not mask[~forced].any()


@pytest.mark.parametrize("ratio", [0, 1, -1, float("nan"), 1.5])
def test_bad_ratio_is_rejected(ratio):
    """compress checks the ratio before any work; 0 only for a quantized run (a quantized dense model)."""
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        check_ratio(ratio)
    if ratio == 0:
        check_ratio(ratio, quantized=True)
