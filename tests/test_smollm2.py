"""The real bundled SmolLM2-135M end to end, at a small calibration size to keep CI short."""
import pytest
import torch

from models.loading import default_model_path, load_model
from sslc_export.calibration import DEFAULT_HELDOUT_TEXT
from sslc_export.checkpoint import load_checkpoint
from sslc_export.compress import CompressJob, compress
from sslc_export.evaluate import greedy_generate, perplexity
from sslc_export.methods import Settings

pytestmark = pytest.mark.slow
HELDOUT = DEFAULT_HELDOUT_TEXT.read_text()[:12000]  # ~3k tokens: six 512-token windows


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
    for method in ("sslc", "magnitude"):
        job = CompressJob(out=folder / method, method=method, ratio=0.3, settings=Settings(iters=8), nsamples=16, seqlen=128)
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


def test_compressed_model_still_writes_english(compressed):
    folder, outcome = compressed["sslc"]
    text = greedy_generate(outcome.loaded.model, outcome.loaded.tokenizer, "The capital of France is", 12)
    assert sum(ch.isalpha() for ch in text) > 10
