"""compress --bits: integers chosen inside the decomposition, stored as they are, exported as they are."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.budget import plan_budget
from sslc_export.calibration import InputStatistics
from sslc_export.checkpoint import checkpoint_grid, encode_layer, load_checkpoint, read_block, read_manifest
from sslc_export.compress import CompressJob, compress
from sslc_export.errors import UserError
from sslc_export.lowrank import balance
from sslc_export.methods import Settings, get_method
from sslc_export.obs import ObsPruner
from sslc_export.onnx.build import export_checkpoint_dir
from sslc_export.onnx.formats import sparse
from sslc_export.onnx.validate import validate
from sslc_export.patterns import Pattern
from sslc_export.quantization import Grid, round_to_nearest
from sslc_export.sparse_rows import dequantize
from test_cli_errors import assert_clean_failure

GRID4 = Grid(4, 32)


def correlated_problem(seed: int, rows: int = 64, cols: int = 128, tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs with strongly correlated columns, where error feedback has something to exploit."""
    torch.manual_seed(seed)
    inputs = torch.randn(tokens, cols) @ torch.randn(cols, cols)
    return torch.randn(rows, cols), inputs


def output_error(weight: torch.Tensor, approximation: torch.Tensor, inputs: torch.Tensor) -> float:
    return float(((weight - approximation) @ inputs.T).norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantizing_inside_the_sweep_beats_quantizing_after_it(seed):
    weight, inputs = correlated_problem(seed)
    pruner = ObsPruner(inputs.T @ inputs, 0.01)
    keep = weight.numel() * 3 // 4
    joint, mask = pruner.prune_quantized(weight, keep, Pattern(), GRID4)
    pruned, _ = pruner.prune(weight, keep, Pattern())
    after = round_to_nearest(pruned, GRID4).dequantize(GRID4)  # zeros outside the mask: scales from kept values
    assert int(mask.sum()) == keep
    assert output_error(weight, joint.dequantize(GRID4), inputs) < 0.95 * output_error(weight, after, inputs)


def test_everything_kept_is_gptq_and_beats_round_to_nearest():
    weight, inputs = correlated_problem(3)
    gptq, mask = ObsPruner(inputs.T @ inputs, 0.01).prune_quantized(weight, weight.numel(), Pattern(), GRID4)
    assert bool(mask.all())
    nearest = round_to_nearest(weight, GRID4).dequantize(GRID4)
    assert output_error(weight, gptq.dequantize(GRID4), inputs) < 0.9 * output_error(weight, nearest, inputs)


@pytest.mark.parametrize("grid", [Grid(8, 32), Grid(4, 32), Grid(4, 48)])
def test_integers_stay_in_range_and_vanish_outside_the_mask(grid):
    weight, inputs = correlated_problem(4, cols=144)
    quantized, mask = ObsPruner(inputs.T @ inputs, 0.01).prune_quantized(weight, weight.numel() // 2, Pattern(), grid)
    assert quantized.q.dtype == torch.int8 and quantized.scales.shape == (64, grid.groups(144))
    assert int(quantized.q.min()) >= grid.qmin and int(quantized.q.max()) <= grid.qmax
    assert not quantized.q[~mask].any()
    assert int(quantized.q.abs().max()) >= grid.qmax  # the grid is used, not collapsed


def heavy_tailed_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student-t weights (a few large entries per group, as in trained LLMs) on correlated inputs."""
    _, inputs = correlated_problem(seed)
    return torch.distributions.StudentT(4.0).sample((64, 128)), inputs


def test_mse_scales_round_each_group_with_no_more_error_than_max():
    torch.manual_seed(6)
    values = torch.distributions.StudentT(4.0).sample((256, 32))
    values[::7] = 0  # all-zero rows keep a zero scale
    weights = torch.rand(32) + 0.1
    for bits in (8, 4):
        plain, searched = Grid(bits, 32, "max"), Grid(bits, 32, "mse")

        def error(scales: torch.Tensor, grid: Grid) -> torch.Tensor:
            safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
            return ((torch.clamp(torch.round(values / safe), grid.qmin, grid.qmax) * safe - values).square() * weights).sum(1)

        largest, best = plain.scales(values, weights), searched.scales(values, weights)
        torch.testing.assert_close(largest, values.abs().amax(1) / plain.qmax)
        assert bool((best <= largest).all()) and bool((best[::7] == 0).all())
        assert bool((error(best, searched) <= error(largest, plain) * (1 + 1e-6)).all())
    assert float(error(best, searched).sum()) < 0.9 * float(error(largest, plain).sum())  # at 4 bits clipping pays


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep_fraction", [1.0, 0.5])
def test_mse_scales_lower_the_sweeps_output_error(seed, keep_fraction):
    weight, inputs = heavy_tailed_problem(seed)
    errors = {}
    for search in ("max", "mse"):
        grid = Grid(4, 32, search)
        keep = int(weight.numel() * keep_fraction)
        quantized, _ = ObsPruner(inputs.T @ inputs, 0.01).prune_quantized(weight, keep, Pattern(), grid)
        errors[search] = output_error(weight, quantized.dequantize(grid), inputs)
    assert errors["mse"] < 0.995 * errors["max"]


def test_posthoc_sparse_export_searches_its_scales():
    """export --format sparse-int4 of an fp32 checkpoint rounds each group at its least-error scale: never worse than
    max |kept| / 7 on a group, clearly better over heavy-tailed values."""
    from sslc_export.sparse_rows import pack

    rng = np.random.default_rng(7)
    weight = rng.standard_t(4, (96, 200)).astype(np.float32)
    keep = rng.random(weight.shape) < 0.45
    packed = pack(weight, keep, np.zeros((96, 0), np.float32), np.zeros((0, 200), np.float32), 4, 64)
    kept = np.where(keep, weight, 0)
    searched = dequantize(packed.main, 4, 64) - kept
    groups = np.zeros((96, 4 * 64), np.float32)
    groups[:, :200] = kept
    groups = groups.reshape(96, 4, 64)
    scales = np.abs(groups).max(axis=2, keepdims=True) / 7
    plain = np.clip(np.rint(groups / np.where(scales > 0, scales, 1)), -8, 7) * scales - groups
    padded = np.zeros((96, 4 * 64), np.float32)
    padded[:, :200] = searched
    per_group = lambda error: np.square(error).reshape(96, 4, 64).sum(axis=2)
    assert (per_group(padded) <= per_group(plain) * (1 + 1e-5) + 1e-12).all()
    assert per_group(padded).sum() < 0.9 * per_group(plain).sum()


def test_scales_enter_the_fingerprint_only_where_they_change_the_result():
    """fp32 and max-scale checkpoints made before --scales existed still match their settings; mse ones do not."""
    assert "scales" not in Settings().record() and "scales" not in Settings(bits=4, scales="max").record()
    assert Settings(bits=4).record()["scales"] == "mse"


def test_refit_rounds_enter_the_fingerprint_only_where_they_change_the_result():
    """Checkpoints made before the refit (rounds 0) and diag-loss ones (which never refit) keep their fingerprints."""
    assert "refit_rounds" not in Settings(refit_rounds=0).record() and "refit_rounds" not in Settings(loss="diag").record()
    assert Settings().record()["refit_rounds"] == 3


def output_energy(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    error = weight - approximation
    return float(((error @ hessian) * error).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_refit_solves_each_rows_kept_values_exactly(seed):
    """After enough passes the kept values are each row's least-squares solution on its mask, H_KK s_K = (W H)_K;
    pruned entries stay 0 and the greedy sweep's loss only goes down."""
    weight, inputs = correlated_problem(seed, rows=24, cols=80)
    pruner = ObsPruner(inputs.T @ inputs, 0.01, blocksize=32)  # several blocks: the lazy gradient update is exercised
    swept, mask = pruner.prune(weight, weight.numel() // 3, Pattern())
    refitted = pruner.refit(weight, swept, mask, passes=60)
    hessian = pruner.hessian
    exact = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        kept = mask[row]
        exact[row, kept] = torch.linalg.solve(hessian[kept][:, kept], (weight[row] @ hessian)[kept])
    assert not refitted[~mask].any()
    torch.testing.assert_close(refitted, exact, rtol=1e-3, atol=1e-3)
    assert output_energy(weight, refitted, hessian) < 0.99 * output_energy(weight, swept, hessian)


@pytest.mark.parametrize("grid", [Grid(4, 32), Grid(8, 16)])
def test_refit_on_the_grid_lowers_the_error_and_stays_on_it(grid):
    weight, inputs = correlated_problem(7, cols=96)
    pruner = ObsPruner(inputs.T @ inputs, 0.01)
    swept, mask = pruner.prune_quantized(weight, weight.numel() // 2, Pattern(), grid)
    refitted = pruner.refit_quantized(weight, swept, mask, grid, passes=3)
    assert refitted.q.dtype == torch.int8 and refitted.scales.shape == swept.scales.shape
    assert int(refitted.q.min()) >= grid.qmin and int(refitted.q.max()) <= grid.qmax
    assert not refitted.q[~mask].any() and bool((refitted.scales >= 0).all())
    hessian = pruner.hessian
    assert (output_energy(weight, refitted.dequantize(grid), hessian)
            < 0.97 * output_energy(weight, swept.dequantize(grid), hessian))


def test_scales_come_from_the_kept_values_only():
    """A diagonal Hessian pushes no error between columns, so each scale is max|kept| / qmax of the weight itself;
    a large weight on a rarely active input is pruned and must not stretch its group's scale."""
    torch.manual_seed(5)
    weight = torch.randn(16, 64)
    activity = torch.ones(64)
    activity[::8] = 1e-6  # inputs that barely fire: their weights go first
    weight[:, ::8] = 50.0
    quantized, mask = ObsPruner(torch.diag(activity), 0.0).prune_quantized(weight, weight.numel() // 2, Pattern(), GRID4)
    assert not mask[:, ::8].any()
    kept = (weight * mask).abs().reshape(16, 2, 32).amax(dim=2)
    torch.testing.assert_close(quantized.scales, kept / GRID4.qmax)


def statistics(inputs: torch.Tensor) -> InputStatistics:
    stats = InputStatistics(inputs.shape[1])
    stats.add_batch(inputs)
    return stats


def test_sslc_with_bits_beats_quantizing_its_fp32_factors_afterwards():
    weight, inputs = correlated_problem(6, rows=96, cols=128, tokens=2048)
    stats, pattern = statistics(inputs), Pattern()
    method = get_method("sslc")
    budget = plan_budget(96, 128, 0.2, 0.1, pattern)  # at 0.2 rounding, not pruning, dominates the error
    settings = method.resolve(Settings(iters=4), pattern)
    fp32 = method.decompose(weight, stats, budget, pattern, settings)
    joint = method.decompose(weight, stats, budget, pattern, method.resolve(Settings(iters=4, bits=4), pattern))
    assert joint.rank == fp32.rank > 0 and int(joint.mask.sum()) == budget.nnz
    u, v = balance(fp32.u, fp32.v)
    after = (round_to_nearest(fp32.sparse, GRID4).dequantize(GRID4)
             + round_to_nearest(u, GRID4).dequantize(GRID4) @ round_to_nearest(v, GRID4).dequantize(GRID4))
    torch.testing.assert_close(joint.dense(), joint.quantized.sparse.dequantize(GRID4)
                               + joint.quantized.u.dequantize(GRID4) @ joint.quantized.v.dequantize(GRID4))
    assert output_error(weight, joint.dense(), inputs) < 0.95 * output_error(weight, after, inputs)


@pytest.fixture(scope="module")
def quantized_checkpoint(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantized") / "ckpt"
    compress(CompressJob(out=folder, model=str(tiny_llama), ratio=0.4, settings=Settings(iters=3, bits=4), nsamples=4, seqlen=32,
                         batch_size=4))
    return folder


def test_checkpoint_stores_integers_and_reads_back_bit_exactly(quantized_checkpoint):
    manifest = read_manifest(quantized_checkpoint)
    assert manifest["quantization"]["bits"] == 4 and manifest["quantization"]["group_size"] == 32
    assert manifest["format_version"] == 3
    stored = load_file(str(quantized_checkpoint / "blocks" / "block-0000.safetensors"))
    assert {stored[key].dtype for key in stored if key.endswith("_q")} == {torch.uint8}  # int4: two to a byte
    assert not any(key.endswith((".u", ".v", ".s_values")) for key in stored)
    layers = read_block(quantized_checkpoint, 0, checkpoint_grid(manifest))
    for name, layer in layers.items():
        again = encode_layer(name, layer)
        assert again.keys() == {key for key in stored if key.startswith(f"{name}.")}
        assert all(torch.equal(again[key], stored[key]) for key in again)
        factors = layer.quantized
        assert torch.equal(layer.sparse, factors.sparse.dequantize(GRID4)) and not factors.sparse.q[~layer.mask].any()


def test_sparse_export_packs_the_checkpoint_integers_unchanged(quantized_checkpoint):
    from sslc_export.onnx.formats.sparse import _packed

    grid = checkpoint_grid(read_manifest(quantized_checkpoint))
    for layer in read_block(quantized_checkpoint, 0, grid).values():
        packed = _packed(layer, 4)
        assert packed.group_size == 32
        joined = np.concatenate([layer.sparse.numpy(), layer.u.numpy()], axis=1)
        assert np.array_equal(dequantize(packed.main, 4, 32), joined)
        assert np.array_equal(dequantize(packed.v, 4, 32), layer.v.numpy())


@pytest.mark.parametrize("activation_bits", [32, 8])
def test_quantized_export_equals_the_dequantized_checkpoint(quantized_checkpoint, tmp_path, monkeypatch, activation_bits):
    """fp32 activations: exact at fp32 tolerance, same greedy tokens; the default int8 activations: within their bound."""
    monkeypatch.setattr(sparse, "ACTIVATION_BITS", activation_bits)
    record = export_checkpoint_dir(quantized_checkpoint, tmp_path / "onnx", "sparse-int4")
    assert record["quantization"]["group_size"] == 32 and record["quantization"]["integers_from"]
    assert record["rtol"] == (1e-5 if activation_bits == 32 else sparse.ACTIVATION_RTOL)
    report = validate(tmp_path / "onnx", load_checkpoint(quantized_checkpoint)[0], rtol=record["rtol"],
                      require_same_tokens=activation_bits == 32)
    assert report.passed, report


def test_fp32_format_of_a_quantized_checkpoint_writes_its_values(quantized_checkpoint, tmp_path):
    record = export_checkpoint_dir(quantized_checkpoint, tmp_path / "onnx", "joined")
    assert validate(tmp_path / "onnx", load_checkpoint(quantized_checkpoint)[0], rtol=record["rtol"]).passed


@pytest.mark.parametrize("fmt, expected", [("sparse-int8", "export it as dense-int4, joined-int4, sparse-int4"),
                                           ("joined-int8", "would round them again")])
def test_formats_that_would_round_again_are_refused(quantized_checkpoint, tmp_path, fmt, expected):
    with pytest.raises(UserError, match=expected):
        export_checkpoint_dir(quantized_checkpoint, tmp_path / "onnx", fmt)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["dense-int4", "joined-int4"])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmulnbits_formats_write_the_checkpoint_integers(quantized_checkpoint, tmp_path, monkeypatch, fmt, accuracy_level):
    """MatMulNBits from the checkpoint's integers and scales, not from a second rounding: with fp32 activations
    (accuracy level 0) the ONNX equals the dequantized checkpoint at fp32 tolerance; at the default level 4 only the
    activations' int8 rounding differs."""
    from sslc_export.onnx import quantize

    monkeypatch.setattr(quantize, "ACCURACY_LEVEL", accuracy_level)
    record = export_checkpoint_dir(quantized_checkpoint, tmp_path / "onnx", fmt)
    assert record["quantization"]["integers_from"] and record["quantization"]["block_size"] == 32
    import onnx

    nodes = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.node
    assert sum(node.op_type == "MatMulNBits" for node in nodes) >= record["compressed_layers"]
    rtol = 1e-5 if accuracy_level == 0 else record["rtol"]
    report = validate(tmp_path / "onnx", load_checkpoint(quantized_checkpoint)[0], rtol=rtol, require_same_tokens=accuracy_level == 0)
    assert report.passed, report


def test_matmulnbits_packing_against_its_definition():
    """Odd shapes: K not a multiple of the block (zero padded), values at both ends of the grid."""
    from sslc_export.onnx.quantize import matmulnbits_weights

    rng = np.random.default_rng(0)
    for bits, block, (rows, cols) in ((4, 16, (3, 40)), (4, 32, (5, 64)), (8, 16, (2, 33))):
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = rng.integers(low, high + 1, (rows, cols)).astype(np.int8)
        q[0, :2] = (low, high)
        scales = rng.random((rows, -(-cols // block))).astype(np.float32)
        packed, flat = matmulnbits_weights(q, scales, bits, block)
        unpacked = packed.reshape(rows, -1)
        if bits == 4:
            unpacked = np.stack([unpacked & 15, unpacked >> 4], axis=-1).reshape(rows, -1)
        values = (unpacked.astype(np.int16) - (1 << (bits - 1))) * np.repeat(flat.reshape(rows, -1), block, axis=1)
        np.testing.assert_array_equal(values[:, :cols], q * np.repeat(scales, block, axis=1)[:, :cols])
        assert not values[:, cols:].any() and packed.shape == (rows, scales.shape[1], block * bits // 8)


def test_ratio_zero_is_a_quantized_dense_model(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "gptq"
    manifest = compress(CompressJob(out=folder, model=str(tiny_llama), ratio=0.0, settings=Settings(bits=4), nsamples=4, seqlen=32,
                                    batch_size=4)).manifest
    assert all(layer["rank"] == 0 and layer["nnz"] == layer["params_total"] for layer in manifest["layers"])
    monkeypatch.setattr(sparse, "ACTIVATION_BITS", 32)
    record = export_checkpoint_dir(folder, tmp_path / "onnx", "sparse-int4")
    assert validate(tmp_path / "onnx", load_checkpoint(folder)[0], rtol=record["rtol"]).passed


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--bits", "5"], "--bits must be one of 32, 8, 4"),
        (["--bits", "4", "--group-size", "24"], "--group-size must be a positive multiple of 16"),
        (["--bits", "4", "--group-size", "0"], "--group-size must be a positive multiple of 16"),
        (["--bits", "4", "--scales", "absmax"], "--scales must be one of mse, max"),
        (["--bits", "4", "--method", "wanda"], "method wanda has no --bits 4"),
        (["--bits", "4", "--loss", "diag"], "use --loss exact"),
        (["--ratio", "0"], "--ratio 0 needs --bits"),
    ],
)
def test_bad_quantization_flags(tiny_llama, tmp_path, flags, expected):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", "--model", str(tiny_llama), "--out", str(out), *flags])
    assert_clean_failure(result, out, expected)


def test_export_cli_refuses_a_mismatched_format(quantized_checkpoint, tmp_path):
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", str(quantized_checkpoint), str(out), "--format", "sparse-int8"])
    assert_clean_failure(result, out, "sparse-int4 (its own integers)")


def _first_layer(checkpoint) -> tuple[str, dict[str, torch.Tensor], Grid]:
    tensors = load_file(str(checkpoint / "blocks" / "block-0000.safetensors"))
    name = next(key for key in tensors if key.endswith(".s_q")).removesuffix(".s_q")
    return name, tensors, checkpoint_grid(read_manifest(checkpoint))


def _legacy_int4(name: str, tensors: dict[str, torch.Tensor], grid: Grid) -> dict[str, torch.Tensor]:
    """The same layer as format 2 wrote it: one int8 per integer, no q_shape."""
    from sslc_export.checkpoint import decode_layer

    layer = decode_layer(name, tensors, grid)
    legacy = {key: value for key, value in tensors.items() if key != f"{name}.q_shape"}
    legacy.update({f"{name}.u_q": layer.quantized.u.q, f"{name}.v_q": layer.quantized.v.q,
                   f"{name}.s_q": layer.quantized.sparse.q.flatten()[layer.mask.flatten()]})
    return legacy


def test_int4_checkpoints_of_format_2_still_read_the_same(quantized_checkpoint):
    from sslc_export.checkpoint import decode_layer

    name, tensors, grid = _first_layer(quantized_checkpoint)
    packed, legacy = decode_layer(name, tensors, grid), decode_layer(name, _legacy_int4(name, tensors, grid), grid)
    for part in ("sparse", "u", "v"):
        assert torch.equal(getattr(packed.quantized, part).q, getattr(legacy.quantized, part).q)
    assert torch.equal(packed.mask, legacy.mask) and torch.equal(packed.u, legacy.u)


def _corrupt(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**tensors, key: value}


def test_a_checkpoint_with_bad_integers_is_refused(quantized_checkpoint):
    """Packed int4 with counts or a shape that disagree, int4 in an 8-bit checkpoint, format-2 integers off the grid."""
    from sslc_export.checkpoint import decode_layer

    name, tensors, grid = _first_layer(quantized_checkpoint)
    legacy = _legacy_int4(name, tensors, grid)
    off_grid = legacy[f"{name}.s_q"].clone()
    off_grid[0] = 100  # outside int4's [-8, 7]
    shape = tensors[f"{name}.q_shape"]
    cases = [
        (_corrupt(tensors, f"{name}.s_q", tensors[f"{name}.s_q"][:-1]), grid),
        (_corrupt(tensors, f"{name}.u_q", torch.cat([tensors[f"{name}.u_q"], tensors[f"{name}.u_q"][:1]])), grid),
        (_corrupt(tensors, f"{name}.q_shape", shape * torch.tensor([1, 2, 1])), grid),
        (_corrupt(tensors, f"{name}.q_shape", -shape), grid),
        (_corrupt(tensors, f"{name}.q_shape", shape.float()), grid),
        (_corrupt(tensors, f"{name}.s_q", tensors[f"{name}.s_q"].to(torch.int8)), grid),
        (tensors, Grid(8, grid.group_size)),
        (_corrupt(legacy, f"{name}.s_q", off_grid), grid),
    ]
    for corrupted, as_grid in cases:
        with pytest.raises(UserError, match="checkpoint is corrupt"):
            decode_layer(name, corrupted, as_grid)


def test_int4_packing_round_trips_odd_counts():
    from sslc_export.quantization import pack_int4, unpack_int4

    for count in (0, 1, 7, 64):
        q = torch.randint(-8, 8, (count,), dtype=torch.int8)
        packed = pack_int4(q)
        assert packed.dtype == torch.uint8 and packed.numel() == (count + 1) // 2
        assert torch.equal(unpack_int4(packed, count), q)
