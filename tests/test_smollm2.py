"""The real bundled SmolLM2-135M end to end, at a small calibration size to keep CI short."""
import pytest
import torch

from sslc_export.models.loading import default_model_path, load_model
from sslc_export.corpus import HELDOUT_TEXTS
from sslc_export.checkpoint import load_checkpoint
from sslc_export.compress import CompressJob, compress
from sslc_export.evaluate import greedy_generate, perplexity
from sslc_export.methods import Settings

pytestmark = pytest.mark.slow
HELDOUT = HELDOUT_TEXTS["prose"].read_text()[:12000]  # ~3k tokens: six 512-token windows


@pytest.fixture(scope="module")
def dense():
    return load_model()


def test_default_model_is_found_and_its_end_token_fixed(dense):
    assert default_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert dense.tokenizer.eos_token == "<|im_end|>"
    assert dense.architecture.model_type == "llama"
    assert len(dense.architecture.blocks(dense.model)) == 30


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol")
    outcomes = {}
    for method in ("sslc", "sparsegpt", "magnitude"):
        job = CompressJob(out=folder / method, method=method, ratio=0.3, settings=Settings(iters=8), nsamples=32, seqlen=128)
        outcomes[method] = (job.out, compress(job))
    return outcomes


def test_sslc_checkpoint_reloads_to_identical_logits(compressed):
    folder, outcome = compressed["sslc"]
    reloaded, manifest = load_checkpoint(folder)
    assert manifest["params_kept"] <= 0.7 * manifest["params_total"]
    assert manifest["source_model"]["kind"] == "gguf"
    tokens = reloaded.tokenizer("Alice was beginning to get very tired", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(outcome.loaded.model(tokens).logits, reloaded.model(tokens).logits)


def test_sslc_keeps_quality_better_than_magnitude(dense, compressed):
    dense_ppl = perplexity(dense.model, dense.tokenizer, HELDOUT)["perplexity"]
    sslc_ppl = perplexity(compressed["sslc"][1].loaded.model, dense.tokenizer, HELDOUT)["perplexity"]
    magnitude_ppl = perplexity(compressed["magnitude"][1].loaded.model, dense.tokenizer, HELDOUT)["perplexity"]
    assert dense_ppl < sslc_ppl < magnitude_ppl
    assert sslc_ppl < 2 * dense_ppl  # ratio 0.3 with a tiny calibration set still keeps the model usable


def test_sslc_beats_sparsegpt_at_a_small_calibration_size(compressed):
    """At equal budget and a small calibration (32 x 128 tokens) the low-rank pair must earn its parameters on the
    real model, not only against the data-free floor. (A strict xfail until 2026-12-08, at 16 x 128: refitting S on its
    mask closed the gap; at 16 windows the two then tied within torch's rounding, the winner changing with the thread
    count, so the fixture takes 32, where sslc led clearly with 1 and 2 threads: issue 10's note.)"""
    tokenizer = compressed["sslc"][1].loaded.tokenizer
    sslc_ppl = perplexity(compressed["sslc"][1].loaded.model, tokenizer, HELDOUT)["perplexity"]
    sparsegpt_ppl = perplexity(compressed["sparsegpt"][1].loaded.model, tokenizer, HELDOUT)["perplexity"]
    assert sslc_ppl < sparsegpt_ppl


def test_compressed_model_still_writes_english(compressed):
    folder, outcome = compressed["sslc"]
    text = greedy_generate(outcome.loaded.model, outcome.loaded.tokenizer, "The capital of France is", 12)
    assert sum(ch.isalpha() for ch in text) > 10


def test_sslc_checkpoint_exports_to_onnx_and_validates(compressed, tmp_path):
    from sslc_export.onnx.build import export_checkpoint_dir
    from sslc_export.onnx.validate import validate

    folder, outcome = compressed["sslc"]
    record = export_checkpoint_dir(folder, tmp_path / "onnx", "dense")
    assert record["compressed_layers"] == 30 * 7
    report = validate(tmp_path / "onnx", load_checkpoint(folder)[0], decode_steps=4)
    assert report.passed, report


def test_structured_checkpoint_exports_to_the_structured_format(tmp_path):
    from sslc_export.onnx.build import export_checkpoint_dir
    from sslc_export.onnx.validate import validate
    from sslc_export.patterns import Pattern

    job = CompressJob(out=tmp_path / "ckpt", method="sslc", ratio=0.3, pattern=Pattern(kind="structured"),
                      settings=Settings(iters=4), nsamples=8, seqlen=128)
    compress(job)
    record = export_checkpoint_dir(job.out, tmp_path / "onnx", "structured")
    assert record["format"] == "structured"
    report = validate(tmp_path / "onnx", load_checkpoint(job.out)[0], decode_steps=4)
    assert report.passed, report


def test_dense_baseline_exports_and_validates(dense, tmp_path):
    from sslc_export.onnx.build import export_dense_model
    from sslc_export.onnx.validate import validate

    record = export_dense_model(None, tmp_path / "onnx")
    assert record["format"] == "dense-baseline"
    assert validate(tmp_path / "onnx", dense, decode_steps=4).passed
