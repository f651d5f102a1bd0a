"""Tiny random LLaMA and Qwen2 through compress -> checkpoint -> reload -> eval."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import interrupted_after_first_block
from sslc_export.checkpoint import load_checkpoint, read_block, read_manifest
from sslc_export.compress import CompressJob, compress
from sslc_export.errors import UserError
from sslc_export.evaluate import perplexity
from sslc_export.layers import SparseLowRankLinear
from sslc_export.methods import Settings
from sslc_export.patterns import Pattern

TINY_CALIB = dict(nsamples=8, seqlen=32, batch_size=4)


def small_job(model, out, **overrides):
    settings = overrides.pop("settings", Settings(iters=5))
    return CompressJob(out=out, model=str(model), settings=settings, **{**TINY_CALIB, **overrides})


@pytest.mark.parametrize("method", ["sslc", "wanda", "sparsegpt", "magnitude", "svd"])
def test_compress_reload_gives_identical_logits(tiny_model, tmp_path, method):
    outcome = compress(small_job(tiny_model, tmp_path / "ckpt", method=method))
    reloaded, manifest = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, reloaded.model.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = outcome.loaded.model(tokens).logits
        actual = reloaded.model(tokens).logits
    assert torch.equal(expected, actual)
    compressed = [m for m in reloaded.model.modules() if isinstance(m, SparseLowRankLinear)]
    assert len(compressed) == 7 * 2
    assert manifest["params_kept"] <= 0.5 * manifest["params_total"] + len(compressed)
    assert manifest["params_kept"] == sum(layer["params_kept"] for layer in manifest["layers"])


@pytest.mark.parametrize("method, pattern", [("sslc", Pattern()), ("sslc", Pattern(kind="nm")), ("sparsegpt", Pattern()),
                                             ("svd", Pattern()), ("sslc", Pattern(kind="structured"))])
def test_params_kept_recomputed_from_the_stored_tensors(tiny_llama, tmp_path, method, pattern):
    """Per layer, from what the block files hold (not from the run's own report): rank·(m + n) + the mask's bits
    equal the manifest's figure and stay within floor((1 - c)·m·n)."""
    ratio = 0.4
    manifest = compress(small_job(tiny_llama, tmp_path / "ckpt", method=method, ratio=ratio, pattern=pattern)).manifest
    reported = {layer["name"]: layer for layer in manifest["layers"]}
    stored = {}
    for index in range(manifest["num_blocks"]):
        stored.update(read_block(tmp_path / "ckpt", index))
    assert stored.keys() == reported.keys()
    for name, layer in stored.items():
        (m, r), n = layer.u.shape, layer.v.shape[1]
        kept = r * (m + n) + int(layer.mask.sum())
        assert int((layer.sparse != 0).sum()) <= int(layer.mask.sum())
        assert kept == reported[name]["params_kept"], name
        assert kept <= math.floor((1 - ratio) * m * n), name
    assert manifest["params_kept"] == sum(layer["params_kept"] for layer in reported.values())


def test_biases_and_norm_weights_are_the_source_models(tmp_path, tiny_model):
    """The synthetic models' biases and norm weights are random (not 0 and 1), so one dropped, zeroed or taken
    from the wrong layer shows here."""
    from sslc_export.models.loading import load_model

    dense = load_model(str(tiny_model)).model
    source = dense.state_dict()
    compress(small_job(tiny_model, tmp_path / "ckpt"))
    reloaded = load_checkpoint(tmp_path / "ckpt")[0].model.state_dict()
    biases = [key for key in source if key.endswith(".bias")]
    norms = [key for key in source if "norm" in key]
    assert len(norms) == 2 * 2 + 1 and len(biases) == (3 * 2 if dense.config.model_type == "qwen2" else 0)  # q, k, v
    for key in biases + norms:
        assert source[key].abs().min() > 0 and not torch.all(source[key] == 1), key
        assert torch.equal(reloaded[key], source[key]), key


@pytest.mark.parametrize("error", [RuntimeError("a bug in the middle of block 0"), UserError("bad input found mid-way")])
def test_an_error_before_a_block_is_saved_leaves_no_partial_folder(tiny_llama, tmp_path, monkeypatch, error):
    """Nothing to resume from: no `.ckpt.partial` (which would make the next run ask for --resume or a delete)."""
    from sslc_export.methods.sslc import Sslc

    calls = []
    original = Sslc.decompose

    def fail_on_the_third_layer(self, *args):
        calls.append(None)
        if len(calls) == 3:
            raise error
        return original(self, *args)

    monkeypatch.setattr(Sslc, "decompose", fail_on_the_third_layer)
    with pytest.raises(type(error)):
        compress(small_job(tiny_llama, tmp_path / "ckpt"))
    assert list(tmp_path.iterdir()) == []


def test_sparse_part_is_stored_compactly(tiny_llama, tmp_path):
    manifest = compress(small_job(tiny_llama, tmp_path / "ckpt", ratio=0.7)).manifest
    dense_bytes = 4 * manifest["params_total"]
    assert manifest["bytes"]["compressed_layers"] < 0.5 * dense_bytes  # 30 % kept + a 1-bit mask, not a zero-filled matrix


def test_resume_after_a_crash_gives_the_same_checkpoint(tiny_llama, tmp_path):
    reference = compress(small_job(tiny_llama, tmp_path / "reference")).manifest
    interrupted_after_first_block(lambda: compress(small_job(tiny_llama, tmp_path / "resumed")))
    assert not (tmp_path / "resumed").exists()  # nothing that looks complete
    with pytest.raises(UserError, match="--resume"):
        compress(small_job(tiny_llama, tmp_path / "resumed"))
    resumed = compress(small_job(tiny_llama, tmp_path / "resumed", resume=True)).manifest
    for name in reference["files"]:
        if name.startswith("blocks/"):
            assert reference["files"][name]["sha256"] == resumed["files"][name]["sha256"], name


@pytest.mark.parametrize("targets", ["all", "attn"])
def test_streamed_resume_gives_the_in_memory_checkpoint(tiny_llama, tmp_path, targets):
    """A streamed run resumed after block 0 writes the same files as one uninterrupted run in memory: the finished
    blocks' norms (and untargeted Linears) are read again for dense.safetensors."""
    reference = compress(small_job(tiny_llama, tmp_path / "reference", targets=targets)).manifest
    interrupted_after_first_block(lambda: compress(small_job(tiny_llama, tmp_path / "resumed", streaming=True, targets=targets)))
    resumed = compress(small_job(tiny_llama, tmp_path / "resumed", streaming=True, targets=targets, resume=True)).manifest
    for name, record in reference["files"].items():
        assert resumed["files"][name]["sha256"] == record["sha256"], name


@pytest.mark.parametrize("targets, suffixes", [("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                               ("mlp", ("gate_proj", "up_proj", "down_proj"))])
def test_targets_compress_only_their_linears(tiny_model, tmp_path, targets, suffixes):
    from sslc_export.models.loading import load_model

    manifest = compress(small_job(tiny_model, tmp_path / "ckpt", targets=targets, ratio=0.4)).manifest
    assert manifest["targets"] == targets
    assert {layer["name"].rsplit(".", 1)[1] for layer in manifest["layers"]} == set(suffixes)
    assert manifest["params_total"] == sum(layer["params_total"] for layer in manifest["layers"])
    source = dict(load_model(str(tiny_model)).model.named_modules())
    reloaded = load_checkpoint(tmp_path / "ckpt")[0].model
    for name, module in reloaded.named_modules():
        if ".layers." in name and name.endswith("_proj"):
            if name.endswith(suffixes):
                assert isinstance(module, SparseLowRankLinear), name
            else:  # the source's own Linear, weights and bias
                assert isinstance(module, torch.nn.Linear), name
                assert torch.equal(module.weight, source[name].weight), name
                assert (module.bias is None) == (source[name].bias is None)
                assert module.bias is None or torch.equal(module.bias, source[name].bias)


def test_tampered_checkpoint_is_refused(tiny_llama, tmp_path):
    compress(small_job(tiny_llama, tmp_path / "ckpt"))
    block = tmp_path / "ckpt" / "blocks" / "block-0001.safetensors"
    block.write_bytes(block.read_bytes()[:-10])
    with pytest.raises(UserError, match="manifest"):
        read_manifest(tmp_path / "ckpt")


def test_exact_loss_and_structured_runs(tiny_llama, tmp_path):
    exact = compress(small_job(tiny_llama, tmp_path / "exact", settings=Settings(iters=3, loss="exact"))).manifest
    assert exact["settings"]["loss"] == "exact"
    structured = compress(small_job(tiny_llama, tmp_path / "structured", pattern=Pattern(kind="structured"))).manifest
    assert structured["pattern"]["kind"] == "structured"


def test_perplexity_windows_score_every_token_once(tiny_llama):
    from sslc_export.models.loading import load_model

    loaded = load_model(str(tiny_llama))
    text = "It is a truth universally acknowledged. " * 40
    count = len(loaded.tokenizer(text, add_special_tokens=False).input_ids)
    for stride in (64, 32):
        result = perplexity(loaded.model, loaded.tokenizer, text, window=64, stride=stride)
        assert result["tokens"] == count - 1
        assert 1.0 < result["perplexity"] < 2 * loaded.model.config.vocab_size


def test_streaming_gives_the_same_checkpoint(tiny_llama, tmp_path):
    whole = compress(small_job(tiny_llama, tmp_path / "whole")).manifest
    streamed_outcome = compress(small_job(tiny_llama, tmp_path / "streamed", streaming=True))
    streamed = streamed_outcome.manifest
    assert streamed_outcome.loaded is None and streamed["streaming"] is True
    for name, entry in whole["files"].items():
        if name.startswith("blocks/") or name == "dense.safetensors":
            assert streamed["files"][name]["sha256"] == entry["sha256"], name


def test_streaming_refuses_gguf(tmp_path):
    from sslc_export.models.loading import default_model_path

    with pytest.raises(UserError, match="GGUF file"):
        compress(CompressJob(out=tmp_path / "out", model=str(default_model_path()), streaming=True))
    assert not (tmp_path / "out").exists()


def test_streaming_peak_memory_is_one_block_not_the_model(tmp_path):
    """Each run in its own process, so peak RSS (recorded in the manifest) is that run's alone."""
    import subprocess
    import sys

    from sslc_export.models.synthetic import build_random_model

    model = build_random_model(tmp_path / "model", hidden_size=768, intermediate_size=3072, num_hidden_layers=8,
                               num_attention_heads=12, num_key_value_heads=12)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    peaks = {}
    for streaming in (False, True):
        out = tmp_path / f"ckpt-{streaming}"
        command = [sys.executable, "-m", "sslc_export.cli", "compress", "--model", str(model), "--method", "wanda",
                   "--out", str(out), "--nsamples", "4", "--seqlen", "32",
                   "--json", str(tmp_path / "m.json")] + ["--streaming"] * streaming
        subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parents[1])
        peaks[streaming] = json.loads((out / "manifest.json").read_text())["peak_rss_bytes"]
    assert model_bytes > 250e6
    assert peaks[True] < peaks[False] - 0.5 * model_bytes, (peaks, model_bytes)


@pytest.mark.parametrize("device", ["cuda", "tpu", "cuda:banana"])
def test_unusable_device_is_a_clear_error_before_any_work(tiny_llama, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU error cannot be shown here")
    with pytest.raises(UserError, match="--device"):
        compress(small_job(tiny_llama, tmp_path / "out", device=device))
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the --device cuda run is checked on a GPU machine")
def test_compress_on_cuda_matches_cpu_quality(tiny_llama, tmp_path):
    """The GPU path computes the same decomposition up to float rounding and its own random SVD probes."""
    on_cpu = compress(small_job(tiny_llama, tmp_path / "cpu")).manifest
    on_gpu = compress(small_job(tiny_llama, tmp_path / "gpu", device="cuda")).manifest
    assert on_gpu["device"] == "cuda" and on_gpu["peak_device_bytes"] > 0
    for cpu_layer, gpu_layer in zip(on_cpu["layers"], on_gpu["layers"]):
        assert gpu_layer["nnz"] == cpu_layer["nnz"] and gpu_layer["rank"] == cpu_layer["rank"]
        assert gpu_layer["relative_loss"] == pytest.approx(cpu_layer["relative_loss"], rel=0.05, abs=1e-3)
    reloaded, _ = load_checkpoint(tmp_path / "gpu")
    assert next(reloaded.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_block_walk_reproduces_the_block_forward(tiny_model, attention):
    """The walk computes each branch as h + output(captured input): it must equal the block's own forward,
    including a last calibration batch smaller than the others (the mask broadcasts)."""
    from sslc_export.models.loading import load_model
    from sslc_export.blockwalk import walk_block
    from sslc_export.compress import _block_inputs

    loaded = load_model(str(tiny_model))
    loaded.model.config._attn_implementation = attention
    tokens = torch.randint(0, loaded.model.config.vocab_size, (5, 16))
    inputs = _block_inputs(loaded, tokens, None, batch_size=2, device=torch.device("cpu"))
    block = loaded.architecture.blocks(loaded.model)[0]
    with torch.no_grad():
        expected = block(inputs.hidden, attention_mask=inputs.attention_mask, position_embeddings=inputs.position_embeddings)
    expected = expected[0] if isinstance(expected, tuple) else expected
    groups = []
    actual = walk_block(block, loaded.architecture, inputs, lambda names, stats: groups.append((names, stats.tokens)))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert groups == [(group, 5 * 16) for group in loaded.architecture.input_groups]
