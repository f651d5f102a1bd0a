"""compare --bits / --rtn / --finetune: each variant at each bit width into its own checkpoint, round-to-nearest of the
dense model is exactly per-group rounding, fine-tuned children beside their parents, a second run recomputes nothing,
bad values are one line and write nothing."""
import json

import pytest
import torch
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.models.loading import load_model
from sslc_export.atomic import sha256_file
from sslc_export.checkpoint import MANIFEST, checkpoint_grid, read_block, read_manifest
from sslc_export.compare import Variant, parse_variants
from sslc_export.compress import CompressJob, compress
from sslc_export.methods import Settings
from sslc_export.quantization import Grid, round_to_nearest
from test_cli_errors import assert_clean_failure

SMALL = ["--nsamples", "4", "--seqlen", "32", "--iters", "2", "--heldout", "prose", "--window", "64", "--extra-losses", ""]


def test_magnitude_at_ratio_0_with_bits_is_round_to_nearest(tiny_llama, tmp_path):
    """Every stored integer and scale equals per-group round-to-nearest of the dense weight: no error feedback."""
    out = tmp_path / "rtn"
    compress(CompressJob(out=out, method="magnitude", ratio=0.0, model=str(tiny_llama), nsamples=2, seqlen=16,
                         settings=Settings(bits=4, group_size=16, scales="max")))
    manifest = read_manifest(out)
    grid = checkpoint_grid(manifest)
    assert grid == Grid(4, 16, "max")
    dense = load_model(str(tiny_llama)).model
    checked = 0
    for index in range(manifest["num_blocks"]):
        for name, layer in read_block(out, index, grid).items():
            weight = dense.get_submodule(name).weight.detach().float()
            expected = round_to_nearest(weight, grid)
            assert torch.equal(layer.quantized.sparse.q, expected.q), name
            assert torch.equal(layer.quantized.sparse.scales, expected.scales), name
            by_hand = weight.reshape(weight.shape[0], -1, 16)  # the tiny model's widths are multiples of 16
            scales = by_hand.abs().amax(dim=2, keepdim=True) / 7
            assert torch.equal(layer.quantized.sparse.q.reshape(by_hand.shape).float(), torch.round(by_hand / scales)), name
            assert layer.mask.all() and layer.u.shape[1] == 0
            checked += 1
    assert checked == manifest["num_blocks"] * 7


def test_bits_labels_and_ratio_0():
    """fp32 keeps the labels of earlier sweeps; ratio 0 runs only at the quantized widths; --rtn comes first."""
    variants = parse_variants("sslc", "0,0.5", "", "uniform", "32,4", rtn=True)
    assert [v.label for v in variants] == ["magnitude-default-r0.0-b4", "sslc-default-r0.0-b4", "sslc-default-r0.5",
                                           "sslc-default-r0.5-b4"]
    assert [v.name for v in variants] == ["RTN int4", "sslc int4 dense (GPTQ)", "sslc", "sslc"]
    assert parse_variants("magnitude", "0", "", "uniform", "4", rtn=True) == [Variant("magnitude", 0.0, None, "uniform", 4)]
    assert parse_variants("sslc", "0.5", "", "uniform", " 4, 4 ,8") == [Variant("sslc", 0.5, None, "uniform", 4),
                                                                      Variant("sslc", 0.5, None, "uniform", 8)]


def test_compare_bits_rtn_finetune_and_reuse(tiny_llama, tmp_path, monkeypatch):
    work, figures, report = tmp_path / "work", tmp_path / "c.json", tmp_path / "results.md"
    args = ["compare", "--model", str(tiny_llama), "--methods", "sslc", "--ratios", "0,0.5", "--bits", "32,4", "--rtn",
            "--finetune", "--finetune-steps", "2", *SMALL, "--work-dir", str(work), "--json", str(figures), "--report", str(report)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(figures.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["dense", "magnitude-default-r0.0-b4", "sslc-default-r0.0-b4", "sslc-default-r0.5",
                                                "sslc-default-r0.5-ft", "sslc-default-r0.5-b4", "sslc-default-r0.5-b4-ft"]
    for row in rows[1:]:  # the bits each checkpoint records, its bytes, the parent each child names
        manifest = read_manifest(work / row["variant"])
        assert (manifest["quantization"] or {"bits": 32})["bits"] == row["bits"]
        assert row["bytes"] == manifest["bytes"]["total"]
        if row["variant"].endswith("-ft"):
            parent = work / row["variant"].removesuffix("-ft")
            assert manifest["finetune"]["parent"]["manifest_sha256"] == sha256_file(parent / MANIFEST)
            assert manifest["finetune"]["settings"]["steps"] == 2
            assert row["compression_seconds"] == read_manifest(parent)["compression_seconds"]
            assert row["finetune_seconds"] == manifest["finetune"]["seconds"]
    assert rows[3]["bytes"] > rows[5]["bytes"]  # int4 factors are smaller than fp32 ones
    scales = {row["variant"]: read_manifest(work / row["variant"])["quantization"]["scales"] for row in rows if row["bits"] == 4}
    assert scales["magnitude-default-r0.0-b4"] == "max"  # the RTN row is onnxruntime's quantizer: scales from max |w|
    assert scales["sslc-default-r0.0-b4"] == scales["sslc-default-r0.5-b4"] == "mse"
    text = report.read_text()
    for cell in ("| RTN int4 |", "| sslc int4 dense (GPTQ) |", "| sslc + finetune |", "| MB | minutes |"):
        assert cell in text
    stamps = {row["variant"]: read_manifest(work / row["variant"])["created"] for row in rows[1:]}

    def recompute(*args, **kwargs):
        raise AssertionError("a finished checkpoint was recomputed")

    monkeypatch.setattr("sslc_export.compare.compress", recompute)
    monkeypatch.setattr("sslc_export.compare.finetune", recompute)
    monkeypatch.setattr("sslc_export.compare.perplexity_per_text", recompute)  # every perplexity comes from the cache
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads(figures.read_text())["rows"]
    assert {row["variant"]: read_manifest(work / row["variant"])["created"] for row in again[1:]} == stamps
    assert [row["perplexity"] for row in again] == [row["perplexity"] for row in rows]
    result = CliRunner().invoke(app, [*args, "--window", "32"])  # another window: measured again
    assert result.exit_code != 0 and isinstance(result.exception, AssertionError)


@pytest.mark.parametrize("flags, expected", [
    (["--bits", "16"], "--bits must be comma-separated values of 32, 8, 4, got '16'"),
    (["--bits", "4,x"], "--bits must be comma-separated values of 32, 8, 4, got '4,x'"),
    (["--bits", ","], "--bits must be comma-separated values"),
    (["--rtn"], "--rtn quantizes the dense model: give a --bits below 32"),
    (["--bits", "4", "--methods", "wanda"], "method wanda has no --bits 4"),
    (["--bits", "32,4", "--extra-losses", "sslc:diag"], "--bits 4 quantizes inside the OBS sweep of --loss exact"),
    (["--ratios", "0"], "--ratio 0 needs --bits 8 or 4"),
    (["--bits", "4", "--finetune", "--finetune-steps", "0"], "--steps, --batch-size and --save-every must be >= 1"),
])
def test_bad_values_are_one_line_and_write_nothing(tiny_llama, tmp_path, flags, expected):
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["compare", "--model", str(tiny_llama), "--methods", "sslc", "--ratios", "0.5",
                                      "--extra-losses", "", "--work-dir", str(work), *flags])
    assert_clean_failure(result, work, expected)
