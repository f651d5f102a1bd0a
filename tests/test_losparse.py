"""losparse: structured S (whole columns or rows), exact budgets, the cubic schedule, a planted low-rank plus
dense-columns layer it recovers where plain SVD cannot, and the pipeline from the CLI to a reloaded checkpoint."""
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.budget import plan_budget
from sslc_export.calibration import InputStatistics
from sslc_export.checkpoint import load_checkpoint, read_block
from sslc_export.compress import CompressJob, compress
from sslc_export.methods import METHODS, Settings
from sslc_export.methods.losparse import cubic_keep
from sslc_export.onnx.formats.structured import kept_lines
from sslc_export.patterns import Pattern

M, N, TRUE_RANK, DENSE_COLUMNS = 192, 128, 4, 48
COLUMNS, ROWS = Pattern(kind="structured"), Pattern(kind="structured", axis="rows")


@pytest.fixture(scope="module")
def planted():
    """Rank 4 plus 48 dense columns: rank 52 in all, more than the 38 an all-low-rank budget at ratio 0.5 affords,
    while rank 5 plus 55 whole columns fit the same budget."""
    torch.manual_seed(0)
    stats = InputStatistics(N)
    stats.add_batch(torch.randn(2048, N) * (0.2 + 2 * torch.rand(N)))
    columns = torch.randperm(N)[:DENSE_COLUMNS]
    dense_columns = torch.zeros(M, N)
    dense_columns[:, columns] = torch.randn(M, DENSE_COLUMNS)
    weight = torch.randn(M, TRUE_RANK) @ torch.randn(TRUE_RANK, N) / 3 + dense_columns + 0.01 * torch.randn(M, N)
    return weight, stats, columns


def decompose(name, weight, stats, ratio=0.5, pattern=COLUMNS, **settings):
    method = METHODS[name]
    settings = method.resolve(Settings(**{"rank_ratio": 0.15, **settings}), pattern)
    method.check(pattern, settings)
    budget = plan_budget(*weight.shape, ratio, method.rank_ratio(settings), pattern)
    return method.decompose(weight, stats, budget, pattern, settings), budget


@pytest.mark.parametrize("pattern", [COLUMNS, ROWS], ids=["columns", "rows"])
@pytest.mark.parametrize("loss", ["exact", "diag"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_budget_is_exact_and_s_is_whole_lines(planted, pattern, loss, ratio):
    weight, stats, _ = planted
    result, budget = decompose("losparse", weight, stats, ratio, pattern, loss=loss, iters=8)
    kept = result.rank * (M + N) + int(result.mask.sum())
    assert result.rank == budget.rank > 0 and int(result.mask.sum()) == budget.nnz
    assert kept == budget.params_kept <= budget.allowed == math.floor((1 - ratio) * M * N)
    assert (result.sparse[~result.mask] == 0).all()
    axis, lines = kept_lines(result.mask.numpy())  # what the structured ONNX layout accepts
    line_length = M if pattern.axis == "columns" else N
    assert axis == pattern.axis and len(lines) * line_length == budget.nnz


def test_cubic_schedule_falls_from_all_lines_to_the_budget():
    kept = [cubic_keep(step, 48, 128, 55) for step in range(64)]
    assert kept[0] < 128 and kept[47] == 55 and kept[-1] == 55
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert kept[11] - kept[23] > kept[23] - kept[35]  # cubic: most lines go early


@pytest.mark.parametrize("loss", ["exact", "diag"])
def test_recovers_planted_dense_columns_where_svd_cannot(planted, loss):
    weight, stats, columns = planted
    losparse, budget = decompose("losparse", weight, stats, loss=loss)
    svd, svd_budget = decompose("svd", weight, stats, pattern=Pattern())
    assert budget.allowed == svd_budget.allowed and svd.rank * (M + N) <= budget.allowed
    assert losparse.mask.all(0)[columns].all()  # every planted column kept whole
    assert stats.relative_error(weight, losparse.dense()) < 0.2 * stats.relative_error(weight, svd.dense())


def test_training_steps_improve_on_the_pruned_svd(planted):
    """One step is the SVD initialisation pruned once (plus the closed-form refit of S); the schedule's steps also
    move U and V to what the pruned lines leave."""
    weight, stats, _ = planted
    once, _ = decompose("losparse", weight, stats, iters=1)
    trained, _ = decompose("losparse", weight, stats, iters=64)
    assert stats.relative_error(weight, trained.dense()) < 0.5 * stats.relative_error(weight, once.dense())


def test_beats_structured_sslc_at_equal_budget_on_correlated_inputs():
    """sslc's structured step has only the diag loss; losparse trains on the exact ‖(W - Ŵ)X‖."""
    torch.manual_seed(1)
    stats = InputStatistics(N)
    stats.add_batch(torch.randn(4096, N) @ (torch.randn(N, N) / N**0.5 + torch.eye(N)))
    weight = torch.randn(M, N)
    losparse, budget = decompose("losparse", weight, stats)
    sslc, sslc_budget = decompose("sslc", weight, stats, loss="diag")
    assert budget == sslc_budget
    assert stats.relative_error(weight, losparse.dense()) < stats.relative_error(weight, sslc.dense())


def test_loss_curve_measures_each_budget_with_fewer_steps(planted):
    """--allocation global's curve: each point is the decomposition with CURVE_STEPS steps, not --iters."""
    from sslc_export.methods.losparse import CURVE_STEPS

    weight, stats, _ = planted
    method = METHODS["losparse"]
    settings = method.resolve(Settings(rank_ratio=0.15, iters=64), COLUMNS)
    budgets = [plan_budget(M, N, ratio, 0.15, COLUMNS) for ratio in (0.3, 0.6)]
    curve = method.loss_curve(weight, stats, budgets, COLUMNS, settings)
    short = [decompose("losparse", weight, stats, ratio, iters=CURVE_STEPS)[0] for ratio in (0.3, 0.6)]
    assert curve == [stats.relative_error(weight, result.dense()) for result in short]
    assert curve[0] < curve[1]


def test_unstructured_pattern_is_refused():
    from sslc_export.errors import UserError

    with pytest.raises(UserError, match="does not support --pattern unstructured"):
        METHODS["losparse"].check(Pattern(), Settings())


def test_compress_checkpoint_reload_gives_identical_logits(tiny_llama, tmp_path):
    job = CompressJob(out=tmp_path / "ckpt", model=str(tiny_llama), method="losparse", ratio=0.4, pattern=COLUMNS,
                      settings=Settings(iters=8), nsamples=8, seqlen=32, batch_size=4)
    outcome = compress(job)
    reloaded, manifest = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, reloaded.model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(outcome.loaded.model(tokens).logits, reloaded.model(tokens).logits)
    assert manifest["method"] == "losparse" and manifest["settings"]["loss"] == "exact" and manifest["settings"]["iters"] == 8
    for index in range(manifest["num_blocks"]):
        for name, layer in read_block(tmp_path / "ckpt", index).items():
            (m, r), n = layer.u.shape, layer.v.shape[1]
            assert r * (m + n) + int(layer.mask.sum()) <= math.floor(0.6 * m * n), name
            assert kept_lines(layer.mask.numpy())[0] == "columns", name


def test_cli_compress_and_compare_default_to_structured(tiny_llama, tmp_path):
    """No --pattern: losparse gets its own (structured); compare gives it the same."""
    runner = CliRunner()
    small = ["--model", str(tiny_llama), "--nsamples", "4", "--seqlen", "32", "--iters", "4"]
    result = runner.invoke(app, ["compress", *small, "--method", "losparse", "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ckpt" / "manifest.json").read_text())["pattern"]["kind"] == "structured"
    result = runner.invoke(app, ["compress", *small, "--method", "losparse", "--pattern", "unstructured", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "does not support --pattern unstructured" in result.output
    result = runner.invoke(app, ["compare", *small, "--methods", "losparse,magnitude", "--ratios", "0.5", "--extra-losses", "",
                                 "--heldout", "prose", "--window", "64", "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    manifests = {name: json.loads((tmp_path / "work" / f"{name}-default-r0.5" / "manifest.json").read_text())
                 for name in ("losparse", "magnitude")}
    assert manifests["losparse"]["pattern"]["kind"] == "structured"
    assert manifests["magnitude"]["pattern"]["kind"] == "unstructured"


@pytest.mark.parametrize("pattern", [COLUMNS, ROWS], ids=["columns", "rows"])
def test_exports_as_the_structured_layout(tiny_llama, tmp_path, pattern):
    """S of every layer becomes the smaller dense MatMul of the `structured` layout; the ONNX gives the checkpoint's logits."""
    from sslc_export.onnx.build import export_checkpoint_dir
    from sslc_export.onnx.validate import validate

    job = CompressJob(out=tmp_path / "ckpt", model=str(tiny_llama), method="losparse", ratio=0.4, pattern=pattern,
                      settings=Settings(iters=4), nsamples=4, seqlen=32, batch_size=4)
    compress(job)
    record = export_checkpoint_dir(tmp_path / "ckpt", tmp_path / "onnx", "structured")
    assert record["compressed_layers"] == 14
    report = validate(tmp_path / "onnx", load_checkpoint(tmp_path / "ckpt")[0])
    assert report.passed, report
