"""hss: RCM, the hierarchical form on planted hierarchical low-rank matrices, exact budgets, the thin-matmul product
against the dense matrix, and `--method hss` through the checkpoint (block-sparse U, V), fine-tuning and the exports."""
import math
import random

import pytest
import torch

from sslc_export.budget import plan_budget
from sslc_export.calibration import InputStatistics
from sslc_export.methods import METHODS, Settings
from sslc_export.methods.hss import HssNode, decompose_hss, hss_params, is_leaf, level_rank, reverse_cuthill_mckee
from sslc_export.patterns import Pattern

LEAF = 32


def bandwidth(neighbours, order):
    position = {node: index for index, node in enumerate(order)}
    return max(abs(position[a] - position[b]) for a, adjacent in enumerate(neighbours) for b in adjacent)


def test_rcm_recovers_a_shuffled_band():
    random.seed(0)
    size, band = 200, 3
    label = list(range(size))
    random.shuffle(label)  # node label[i] sits at position i of the band
    neighbours = [[] for _ in range(size)]
    for i in range(size):
        for j in range(max(0, i - band), min(size, i + band + 1)):
            if i != j:
                neighbours[label[i]].append(label[j])
    assert bandwidth(neighbours, list(range(size))) > 50
    assert bandwidth(neighbours, reverse_cuthill_mckee(neighbours)) <= 2 * band


def planted_hierarchical(rows, cols, top_rank, level=0):
    """A matrix exactly of the hierarchical form: random dense leaves, off-diagonal blocks of rank k_l."""
    if is_leaf(rows, cols, LEAF):
        return torch.randn(rows, cols)
    top, left = rows // 2, cols // 2
    rank = level_rank(top_rank, level)
    return torch.cat([
        torch.cat([planted_hierarchical(top, left, top_rank, level + 1), torch.randn(top, rank) @ torch.randn(rank, cols - left)], 1),
        torch.cat([torch.randn(rows - top, rank) @ torch.randn(rank, left), planted_hierarchical(rows - top, cols - left, top_rank, level + 1)], 1),
    ], 0)


@pytest.mark.parametrize("shape", [(256, 256), (96, 288), (300, 200)])
def test_hierarchical_form_reproduces_a_planted_one(shape):
    torch.manual_seed(0)
    planted = planted_hierarchical(*shape, top_rank=8)
    tree = HssNode.build(planted, top_rank=8, leaf=LEAF)
    assert tree.params() == hss_params(*shape, 8, LEAF) < planted.numel()
    torch.testing.assert_close(tree.to_dense(), planted, rtol=1e-4, atol=1e-3)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(tree.matmul(x), x @ planted.T, rtol=1e-4, atol=1e-3)


def layer_stats(size):
    stats = InputStatistics(size)
    stats.add_batch(torch.randn(1024, size) * (0.5 + torch.rand(size)))
    return stats


def spikes(size, count, scale):
    values = torch.zeros(size * size)
    values[torch.randperm(size * size)[:count]] = scale * torch.randn(count)
    return values.view(size, size)


def relative_errors(weight, stats, ratio, **options):
    """hss (with `options`) and svd at the same budget."""
    budget = plan_budget(*weight.shape, ratio, 1.0, Pattern())
    result = decompose_hss(weight, stats, budget, low_rank_share=0.99, leaf=LEAF, **options)
    assert result.params() == budget.allowed
    svd = METHODS["svd"].decompose(weight, stats, budget, Pattern(), METHODS["svd"].resolve(Settings(), Pattern()))
    return stats.relative_error(weight, result.dense()), stats.relative_error(weight, svd.dense())


def test_reproduces_a_planted_hierarchical_residual():
    """30 spikes on a matrix of the hierarchical form (k_0 = 8): S takes the spikes and, the budget being what it
    is, some of the form's own entries; rebuilding H with those holes filled (refits) recovers the form."""
    torch.manual_seed(0)
    weight = planted_hierarchical(256, 256, top_rank=8) + spikes(256, 30, 30.0)
    stats = layer_stats(256)
    error, svd_error = relative_errors(weight, stats, 0.7, reorder=False)
    no_refit, _ = relative_errors(weight, stats, 0.7, reorder=False, refits=0)
    assert error < 0.06 and error < 0.3 * svd_error and error < 0.5 * no_refit


def test_rcm_puts_a_shuffled_band_back_near_the_diagonal():
    """A band (|i - j| <= 4) plus spikes, rows and columns shuffled apart: only in RCM's order do the dense
    diagonal blocks and the low-rank off-diagonal corners hold the band."""
    torch.manual_seed(0)
    index = torch.arange(256)
    band = torch.randn(256, 256) * ((index[:, None] - index[None, :]).abs() <= 4)
    weight = (band + 0.05 * torch.randn(256, 2) @ torch.randn(2, 256) + spikes(256, 30, 5.0))
    weight = weight[torch.randperm(256)][:, torch.randperm(256)]
    stats = layer_stats(256)
    error, svd_error = relative_errors(weight, stats, 0.7)
    unordered, _ = relative_errors(weight, stats, 0.7, reorder=False)
    assert error < 0.75 * unordered and error < 0.6 * svd_error


@pytest.mark.parametrize("shape, ratio", [((192, 576), 0.5), ((576, 192), 0.3), ((300, 200), 0.6)])
def test_budget_is_exact_and_the_product_is_the_matrix(shape, ratio):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    stats = InputStatistics(shape[1])
    stats.add_batch(torch.randn(512, shape[1]) * (0.2 + torch.rand(shape[1])))
    budget = plan_budget(*shape, ratio, 1.0, Pattern())
    result = decompose_hss(weight, stats, budget, leaf=LEAF)
    assert result.params() == budget.allowed == math.floor((1 - ratio) * shape[0] * shape[1])
    assert (result.sparse[~result.mask] == 0).all()
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(result.matmul(x), x @ result.dense().T, rtol=1e-4, atol=1e-3)
    assert stats.relative_error(weight, result.dense()) < 1.0


def test_leaves_too_large_for_the_budget_are_refused():
    from sslc_export.errors import UserError

    stats = InputStatistics(256)
    stats.add_batch(torch.randn(64, 256))
    with pytest.raises(UserError, match="cannot hold its dense"):
        decompose_hss(torch.randn(256, 256), stats, plan_budget(256, 256, 0.9, 1.0, Pattern()), leaf=128)


@pytest.mark.parametrize("shape, ratio", [((192, 576), 0.5), ((300, 200), 0.6)])
def test_flattened_is_the_same_matrix_in_the_same_budget(shape, ratio):
    """The tree written as S' + U·V (what the checkpoint and the exports hold): the same matrix, U and V zero off
    their supports, and the supports plus S' count exactly the budget."""
    torch.manual_seed(1)
    weight = torch.randn(*shape)
    stats = layer_stats_of(shape[1])
    budget = plan_budget(*shape, ratio, 0.0, Pattern())
    tree = decompose_hss(weight, stats, budget, leaf=LEAF)
    flat = tree.flattened()
    torch.testing.assert_close(flat.dense(), tree.dense(), rtol=1e-5, atol=1e-5)
    u_support, v_support = flat.factor_masks
    assert (flat.u[~u_support] == 0).all() and (flat.v[~v_support] == 0).all() and (flat.sparse[~flat.mask] == 0).all()
    assert flat.params() == tree.params() == budget.allowed
    assert flat.params() < int(flat.mask.sum()) + flat.rank * sum(shape)  # dense factors of that width would not fit


def layer_stats_of(size):
    stats = InputStatistics(size)
    stats.add_batch(torch.randn(512, size) * (0.2 + torch.rand(size)))
    return stats


def hss_checkpoint(model, folder, **options):
    from sslc_export.compress import CompressJob, compress

    return compress(CompressJob(out=folder, model=str(model), method="hss", ratio=0.4, nsamples=8, seqlen=32, batch_size=4,
                                **options))


def test_method_through_checkpoint_and_reload(tiny_model, tmp_path):
    from sslc_export.checkpoint import load_checkpoint, read_block

    outcome = hss_checkpoint(tiny_model, tmp_path / "ckpt")
    reloaded, manifest = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, reloaded.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(outcome.loaded.model(tokens).logits, reloaded.model(tokens).logits)
    reported = {layer["name"]: layer for layer in manifest["layers"]}
    for index in range(manifest["num_blocks"]):
        for name, layer in read_block(tmp_path / "ckpt", index).items():
            u_support, v_support = layer.factor_masks
            kept = int(layer.mask.sum()) + int(u_support.sum()) + int(v_support.sum())
            assert kept == reported[name]["params_kept"] == reported[name]["params_allowed"], name
            assert (layer.u[~u_support] == 0).all() and (layer.v[~v_support] == 0).all()


@pytest.mark.parametrize("tamper", ["values", "mask"])
def test_factor_supports_that_disagree_with_their_values_are_refused(tiny_llama, tmp_path, tamper):
    from safetensors.torch import load_file, save_file

    from sslc_export.checkpoint import read_block
    from sslc_export.errors import UserError

    hss_checkpoint(tiny_llama, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "blocks" / "block-0000.safetensors"
    tensors = load_file(str(path))
    key = next(key for key in tensors if key.endswith(f".u_{tamper}"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(path))
    with pytest.raises(UserError, match="checkpoint is corrupt"):
        read_block(tmp_path / "ckpt", 0)


def test_finetune_keeps_the_supports(tiny_llama, tmp_path):
    from sslc_export.checkpoint import read_block
    from sslc_export.finetune import FinetuneJob, finetune

    hss_checkpoint(tiny_llama, tmp_path / "ckpt")
    finetune(FinetuneJob(tmp_path / "ckpt", tmp_path / "ft", loss="lm", steps=3, seqlen=32, batch_size=2, lr=1e-2))
    parent, child = read_block(tmp_path / "ckpt", 0), read_block(tmp_path / "ft", 0)
    for name, layer in child.items():
        for trained, before, support, other in zip((layer.u, layer.v), (parent[name].u, parent[name].v), layer.factor_masks,
                                                   parent[name].factor_masks):
            assert torch.equal(support, other) and (trained[~support] == 0).all()
            assert not torch.allclose(trained, before)  # it did train


@pytest.mark.parametrize("fmt, targets", [("sparse", "all"), ("dense", "all"), ("sparse", "attn")])
def test_exports_validate_with_block_sparse_factors(tiny_model, tmp_path, fmt, targets):
    """`sparse` packs U and V on their supports in our operator (fused q/k/v and gate/up included), `dense` writes them
    whole; both compute the checkpoint at fp32 tolerance, also with the MLP left dense (--targets attn)."""
    from sslc_export.checkpoint import load_checkpoint
    from sslc_export.onnx.build import export_checkpoint_dir
    from sslc_export.onnx.validate import validate

    hss_checkpoint(tiny_model, tmp_path / "ckpt", targets=targets)
    record = export_checkpoint_dir(tmp_path / "ckpt", tmp_path / "onnx", fmt)
    assert record["compressed_layers"] == (14 if targets == "all" else 8)
    report = validate(tmp_path / "onnx", load_checkpoint(tmp_path / "ckpt")[0])
    assert report.passed, report
