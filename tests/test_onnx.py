"""Export every format from tiny random LLaMA and Qwen2 checkpoints, validate, and drive the
result with optimum's ORTModelForCausalLM unmodified."""
import json
import shutil

import numpy as np
import onnx
from transformers import AutoConfig
import pytest
import torch
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.models.architectures import architecture_for
from sslc_export.models.loading import load_model
from sslc_export.checkpoint import load_checkpoint, read_block
from sslc_export.compress import CompressJob, compress
from sslc_export.errors import UserError
from sslc_export.methods import Settings
from sslc_export.onnx import build
from sslc_export.onnx.build import export_checkpoint_dir
from sslc_export.onnx.formats import get_format
from sslc_export.onnx.rewrite import rewrite
from sslc_export.onnx.validate import validate
from sslc_export.patterns import Pattern

PATTERNS = {
    "dense": Pattern(),
    "joined": Pattern(),
    "structured": Pattern(kind="structured"),
    "structured-rows": Pattern(kind="structured", axis="rows"),
    "nm": Pattern(kind="nm"),
    "sparse": Pattern(),
}


def checkpoint(model, folder, pattern):
    job = CompressJob(out=folder, model=str(model), ratio=0.4, pattern=pattern, settings=Settings(iters=3),
                      nsamples=4, seqlen=32, batch_size=4)
    compress(job)
    return folder


@pytest.mark.parametrize("variant", list(PATTERNS))
def test_every_format_validates(tiny_model, tmp_path, variant):
    ckpt = checkpoint(tiny_model, tmp_path / "ckpt", PATTERNS[variant])
    fmt = variant.split("-")[0]
    record = export_checkpoint_dir(ckpt, tmp_path / "onnx", fmt)
    assert record["compressed_layers"] == 14 and record["onnx_bytes"] > 0 and record["rtol"] == 1e-5
    fused = fmt != "nm"  # nm is for TensorRT, which does not run onnxruntime's contrib operators
    assert record["graph"]["kind"] == ("fused" if fused else "optimum")
    assert record["graph"]["GroupQueryAttention"] == (2 if fused else 0)  # every layer of the tiny models
    report = validate(tmp_path / "onnx", load_checkpoint(ckpt)[0])
    assert report.passed, report


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("activation_bits", [32, 8])
def test_sparse_quantized_formats_equal_their_dequantized_checkpoint(tiny_model, tmp_path, bits, activation_bits, monkeypatch):
    """The kept values are quantized inside the format: with fp32 activations the ONNX must compute exactly
    the dequantized factors (fp32 tolerance, same greedy tokens); with int8 activations (the default) it may
    differ from them only by the activations' rounding; and it differs from the fp32 checkpoint."""
    from sslc_export.onnx.formats import sparse
    from sslc_export.onnx.validate import exact_reference

    monkeypatch.setattr(sparse, "ACTIVATION_BITS", activation_bits)
    ckpt = checkpoint(tiny_model, tmp_path / "ckpt", Pattern())
    record = export_checkpoint_dir(ckpt, tmp_path / "onnx", f"sparse-int{bits}")
    assert record["rtol"] == (1e-5 if activation_bits == 32 else sparse.ACTIVATION_RTOL)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    ops = [n for n in graph.graph.node if n.domain == "ai.sslc"]
    assert len(ops) == 4 * 2 and {n.op_type for n in ops} == {f"SparseMatMulInt{bits}"}  # q/k/v and gate/up merged
    assert not [n for n in graph.graph.node if n.op_type in ("MatMulNBits", "MatMul") and n.name.startswith("model.layers")]
    assert record["quantization"]["bits"] == bits and record["custom_ops"] == "ai.sslc"
    exact = exact_reference(record, ckpt, load_checkpoint(ckpt)[0])
    report = validate(tmp_path / "onnx", exact, rtol=record["rtol"], require_same_tokens=activation_bits == 32)
    assert report.passed, report
    assert validate(tmp_path / "onnx", load_checkpoint(ckpt)[0], rtol=record["rtol"]).max_relative_error > 1e-4  # really quantized


def test_sparse_format_is_smaller_than_dense(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    sizes = {fmt: export_checkpoint_dir(ckpt, tmp_path / fmt, fmt)["onnx_bytes"] for fmt in ("dense", "sparse", "sparse-int4")}
    assert sizes["sparse-int4"] < sizes["sparse"] < sizes["dense"]


def test_structured_format_is_smaller_than_dense(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern(kind="structured"))
    dense = export_checkpoint_dir(ckpt, tmp_path / "dense", "dense")["onnx_bytes"]
    structured = export_checkpoint_dir(ckpt, tmp_path / "structured", "structured")["onnx_bytes"]
    assert structured < dense


def test_optimum_loads_and_generates_like_pytorch(tiny_model, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    ckpt = checkpoint(tiny_model, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    reference, _ = load_checkpoint(ckpt)
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    prompt = reference.tokenizer("It is a truth universally", return_tensors="pt")
    kwargs = dict(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=8, do_sample=False)
    expected = reference.model.generate(**kwargs)
    assert torch.equal(ort_model.generate(**kwargs), expected)


def test_onnxruntime_genai_runs_the_folder_unmodified(tiny_model, tmp_path):
    from sslc_export.runtimes.genai import GenaiCausalLM
    from sslc_export.runtimes.session import OnnxCausalLM

    ckpt = checkpoint(tiny_model, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    reference, _ = load_checkpoint(ckpt)
    ids = reference.tokenizer("It is a truth universally", return_tensors="np").input_ids
    runtime = OnnxCausalLM(tmp_path / "onnx")
    ours, past, step_ids = [], runtime.empty_past(), ids
    for _ in range(8):
        logits, past = runtime.step(step_ids, past)
        ours.append(int(logits[0, -1].argmax()))
        step_ids = np.array([[ours[-1]]])
    tokens, seconds = GenaiCausalLM(tmp_path / "onnx", threads=1).greedy(ids[0].tolist(), 8)
    assert len(tokens) > 0 and len(seconds) == len(tokens)
    assert tokens == ours[: len(tokens)]  # genai stops early only at the end token


def test_unsupported_pairing_names_the_needed_pattern(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    with pytest.raises(UserError, match="needs a checkpoint compressed with --pattern structured"):
        export_checkpoint_dir(ckpt, tmp_path / "onnx", "structured")
    assert not (tmp_path / "onnx").exists()


def test_rewrite_fails_loudly_on_a_missing_or_mismatched_layer(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    layers = read_block(ckpt, 0)
    name, layer = next(iter(layers.items()))
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    with pytest.raises(UserError, match="found no MatMul"):
        rewrite(graph, {"model.layers.7.mlp.up_proj": layer}, get_format("dense"), architecture_for("llama"))
    with pytest.raises(UserError, match="found no MatMul|not S \\+ U·V|no constant weight"):
        rewrite(graph, {name: layer}, get_format("dense"), architecture_for("llama"))  # already rewritten: the original MatMul is gone


def test_weight_identity_is_checked(tiny_llama, tmp_path):
    from sslc_export.onnx.export import export_dense

    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    dense = load_model(str(tiny_llama))  # the uncompressed graph: its weights are not S + U·V
    (tmp_path / "raw").mkdir()
    export_dense(dense.model, dense.tokenizer, tmp_path / "raw")
    graph = onnx.load(str(tmp_path / "raw" / "model.onnx"))
    with pytest.raises(UserError, match="not S \\+ U·V"):
        rewrite(graph, read_block(ckpt, 0), get_format("dense"), architecture_for("llama"))


def test_cli_export_and_validate(tiny_llama, tmp_path):
    runner = CliRunner()
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    result = runner.invoke(app, ["export", str(ckpt), str(tmp_path / "onnx"), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["format"] == "dense"
    result = runner.invoke(app, ["validate", str(tmp_path / "onnx"), str(ckpt), "--json", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    result = runner.invoke(app, ["export", "--dense", str(tiny_llama), str(tmp_path / "baseline")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "baseline"), str(tiny_llama)])
    assert result.exit_code == 0, result.output
    # An ONNX folder validated against the wrong reference fails with exit 1.
    result = runner.invoke(app, ["validate", str(tmp_path / "baseline"), str(ckpt)])
    assert result.exit_code == 1, result.output


def test_validate_refuses_a_tampered_export(tiny_llama, tmp_path):
    runner = CliRunner()
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    model_file = tmp_path / "onnx" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    result = runner.invoke(app, ["validate", str(tmp_path / "onnx"), str(ckpt)])
    assert result.exit_code == 2 and "manifest hash" in " ".join(result.output.split())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_formats_use_matmulnbits_and_stay_close(tiny_llama, tmp_path, fmt):
    from sslc_export.onnx.validate import default_rtol

    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    record = export_checkpoint_dir(ckpt, tmp_path / "onnx", fmt)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    quantized = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == 14 * 2  # V and the joined [Sᵀ; Uᵀ] of every compressed layer, not the lm_head
    assert all(n.name.startswith("model.layers.") for n in quantized)
    assert record["quantization"]["bits"] == int(fmt[-1]) and record["format"] == f"joined-{fmt}"
    report = validate(tmp_path / "onnx", load_checkpoint(ckpt)[0], rtol=default_rtol(record), require_same_tokens=False)
    assert report.passed, report
    assert report.max_relative_error > 1e-6  # it really is quantized
    assert report.worst_at.startswith("prompt '") and ", token " in report.worst_at  # says where


def test_dense_int4_baseline(tiny_llama, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--dense", str(tiny_llama), str(tmp_path / "int4"), "--format", "int4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", str(tmp_path / "int4"), str(tiny_llama)])
    assert result.exit_code == 0, result.output


def test_run_generation_matches_pytorch_greedy(tiny_llama, tmp_path):
    from sslc_export.runtimes.generate import generate
    from sslc_export.runtimes.session import OnnxCausalLM

    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    reference, _ = load_checkpoint(ckpt)
    prompt = "It is a truth universally"
    ids = reference.tokenizer(prompt, return_tensors="pt").input_ids
    expected = reference.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    tokens = [token for token, _ in generate(OnnxCausalLM(tmp_path / "onnx"), reference.tokenizer, prompt, 10)]
    assert tokens == expected.tolist()[: len(tokens)] and len(tokens) > 0
    sampled = [t for t, _ in generate(OnnxCausalLM(tmp_path / "onnx"), reference.tokenizer, prompt, 10, temperature=1.0, seed=3)]
    again = [t for t, _ in generate(OnnxCausalLM(tmp_path / "onnx"), reference.tokenizer, prompt, 10, temperature=1.0, seed=3)]
    assert sampled == again  # seeded sampling is reproducible
    result = CliRunner().invoke(app, ["run", str(tmp_path / "onnx"), "--prompt", prompt, "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["run", str(tmp_path / "onnx"), "--prompt", prompt, "--provider", "cuda"])
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert result.exit_code == 2 and "not available" in result.output


def test_bench_rounds_pool_every_timing_and_keep_the_first_rounds_perplexity():
    from sslc_export.runtimes.bench import pool, summarize

    first = {"samples": {"prefill": {"16": [0.010, 0.012]}, "decode": [0.001, 0.003], "genai": [0.002]},
             "genai": {"greedy_agreement": 1.0}, "perplexity": {"text": 5.0}, "peak_rss_bytes": 10}
    later = {"samples": {"prefill": {"16": [0.030]}, "decode": [0.005], "genai": [0.004]},
             "genai": {"greedy_agreement": 0.5}, "peak_rss_bytes": 20}
    pool(first, later)
    row = summarize(first)
    assert row["decode"]["p50_ms"] == pytest.approx(3.0) and row["prefill"]["16"]["p50_ms"] == pytest.approx(12.0)
    assert row["prefill"]["16"]["tokens_per_s"] == pytest.approx(16 / 0.012)
    assert row["genai"] == {"greedy_agreement": 1.0, "decode": {"p50_ms": pytest.approx(3.0), "p90_ms": pytest.approx(3.8),
                                                                 "tokens_per_s": pytest.approx(1e3 / 3.0)}}
    assert row["perplexity"] == {"text": 5.0} and row["peak_rss_bytes"] == 20 and "samples" not in row


def test_bench_writes_json_markdown_and_a_real_png(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern(kind="structured"))
    runner = CliRunner()
    assert runner.invoke(app, ["export", "--dense", str(tiny_llama), str(tmp_path / "dense")]).exit_code == 0
    assert runner.invoke(app, ["export", str(ckpt), str(tmp_path / "structured"), "--format", "structured"]).exit_code == 0
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60)
    code = tmp_path / "code.txt"
    code.write_text("def fortune(man):\n    return {'single': man, 'wife': None}\n\n" * 60)
    result = runner.invoke(app, ["bench", str(tmp_path / "dense"), str(tmp_path / "structured"), "--heldout", f"{text},{code}",
                                 "--prompt-lengths", "16,64", "--decode-tokens", "8", "--repeats", "2", "--genai", "--rounds", "2",
                                 "--out-dir", str(tmp_path / "bench"), "--report", str(tmp_path / "results.md")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["dense", "structured"]
    for row in report["rows"]:
        assert row["decode"]["p50_ms"] > 0 and row["decode"]["p90_ms"] >= row["decode"]["p50_ms"]
        assert set(row["prefill"]) == {"16", "64"} and row["peak_rss_bytes"] > 0
        assert list(row["perplexity"]) == ["text", "code"] and min(row["perplexity"].values()) > 1
        assert row["perplexity"]["text"] != row["perplexity"]["code"]  # each measured on its own text
        assert row["genai"]["decode"]["p50_ms"] > 0 and 0 <= row["genai"]["greedy_agreement"] <= 1
    markdown = (tmp_path / "bench" / "bench.md").read_text()
    assert "| dense | cpu |" in markdown and "1.00x" in markdown and "ppl text | ppl code" in markdown
    assert "prefill 16 tok/s | prefill 64 tok/s |" in markdown
    png = (tmp_path / "bench" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image

    with Image.open(tmp_path / "bench" / "bench.png") as image:
        assert image.size[0] > 500 and len(set(image.convert("L").getdata())) > 10  # not a blank canvas
    assert "<!-- BEGIN bench -->" in (tmp_path / "results.md").read_text()

    # A broken folder after the baseline is reported, the baseline row is still written, the report is not touched.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "dense", broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    result = runner.invoke(app, ["bench", str(tmp_path / "dense"), str(broken), "--no-perplexity", "--prompt-lengths", "16",
                                 "--decode-tokens", "2", "--repeats", "1", "--out-dir", str(tmp_path / "bench2"),
                                 "--report", str(tmp_path / "results2.md")])
    assert result.exit_code != 0 and "1 folder(s) failed" in result.output, result.output
    report = json.loads((tmp_path / "bench2" / "bench.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["dense"] and report["failures"][0]["model"] == "broken"
    assert not (tmp_path / "results2.md").exists()


def test_bench_refuses_an_unavailable_provider(tiny_llama, tmp_path):
    result = CliRunner().invoke(app, ["bench", str(tmp_path), "--provider", "tensorrt"])
    if "TensorrtExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert result.exit_code == 2 and "not available" in result.output


def test_io_binding_path_matches_plain_run(tiny_llama, tmp_path):
    """The GPU providers keep the KV cache on the device through IO binding; the same code path,
    bound to host memory, must reproduce the plain run's logits step for step."""
    from sslc_export.runtimes.session import OnnxCausalLM

    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    plain, bound = OnnxCausalLM(tmp_path / "onnx"), OnnxCausalLM(tmp_path / "onnx", io_binding=True)
    ids = np.array([[5, 17, 42, 7, 99]])
    plain_past, bound_past = plain.empty_past(), bound.empty_past()
    for _ in range(4):
        plain_logits, plain_past = plain.step(ids, plain_past)
        bound_logits, bound_past = bound.step(ids, bound_past)
        np.testing.assert_allclose(bound_logits, plain_logits, rtol=1e-5, atol=1e-5)
        ids = np.array([[int(plain_logits[0, -1].argmax())]])
    assert bound_past[0].shape()[2] == plain_past[0].shape[2] == 8


def test_quantization_touches_exactly_the_intended_nodes(tmp_path):
    """Untied lm_head: onnxruntime's quantizer would take every constant MatMul; ours quantizes only the
    format's own MatMuls, and the lm_head and embedding only when --lm-head asks."""
    from sslc_export.models.synthetic import build_random_model

    untied = build_random_model(tmp_path / "untied", "llama", tie_word_embeddings=False)
    ckpt = checkpoint(untied, tmp_path / "ckpt", Pattern())
    for lm_head, head_ops in (("fp32", set()), ("int4", {"MatMulNBits", "GatherBlockQuantized"})):
        record = export_checkpoint_dir(ckpt, tmp_path / lm_head, "joined-int4", lm_head=lm_head)
        nodes = onnx.load(str(tmp_path / lm_head / "model.onnx")).graph.node
        ours = [n for n in nodes if n.op_type == "MatMulNBits" and n.name.startswith("model.layers.")]
        others = {n.op_type for n in nodes if n.op_type in ("MatMulNBits", "GatherBlockQuantized") and not n.name.startswith("model.layers.")}
        assert len(ours) == 14 * 2 and others == head_ops, (lm_head, others)
        assert record["lm_head"] == lm_head
        report = validate(tmp_path / lm_head, load_checkpoint(ckpt)[0], rtol=record["rtol"], require_same_tokens=False)
        assert report.passed, report


@pytest.mark.parametrize("lm_head", ["int4", "int8"])
def test_tied_lm_head_is_quantized_once_and_stays_tied(tiny_llama, tmp_path, lm_head):
    """A tied lm_head reads Transpose(embedding): --lm-head int4/int8 quantizes it once, and the embedding
    reads the head's own bytes (GatherBlockQuantized over a Reshape of MatMulNBits' weight and scales)."""
    from sslc_export.runtimes.genai import GenaiCausalLM

    folder = tmp_path / lm_head
    record = build.export_dense_model(str(tiny_llama), folder, "int4", lm_head=lm_head)
    model = onnx.load(str(folder / "model.onnx"))
    nodes = {n.op_type: n for n in model.graph.node if n.op_type in ("GatherBlockQuantized",) or "logits" in n.output}
    head, gather = nodes["MatMulNBits"], nodes["GatherBlockQuantized"]
    producers = {out: n for n in model.graph.node for out in n.output}
    assert [producers[gather.input[i]].input[0] for i in (0, 2)] == list(head.input[1:3])
    config = AutoConfig.from_pretrained(tiny_llama)
    float_tables = [i for i in model.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT and sorted(i.dims) == sorted([config.vocab_size, config.hidden_size])]
    assert not float_tables  # no fp32 copy left, and no second quantized one
    report = validate(folder, load_model(str(tiny_llama)), rtol=record["rtol"], require_same_tokens=False)
    assert report.passed, report
    tokens, _ = GenaiCausalLM(folder, threads=1).greedy([5, 17, 42], 3)
    assert len(tokens) == 3


def test_sparse_folder_runs_in_optimum_and_genai(tiny_llama, tmp_path):
    """ORTModelForCausalLM with the one-line session options, and onnxruntime-genai through genai_config.json."""
    from optimum.onnxruntime import ORTModelForCausalLM

    from sslc_export.runtimes import kernels
    from sslc_export.runtimes.genai import GenaiCausalLM

    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "sparse")
    reference, _ = load_checkpoint(ckpt)
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx", session_options=kernels.session_options())
    prompt = reference.tokenizer("It is a truth universally", return_tensors="pt")
    kwargs = dict(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=8, do_sample=False)
    expected = reference.model.generate(**kwargs)
    assert torch.equal(ort_model.generate(**kwargs), expected)
    config = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == str(kernels.library_path().resolve())
    tokens, _ = GenaiCausalLM(tmp_path / "onnx", threads=1).greedy(prompt.input_ids[0].tolist(), 8)
    assert tokens == expected[0, prompt.input_ids.shape[1]:].tolist()[: len(tokens)] and tokens


def test_sparse_formats_without_the_library_name_the_fix(tiny_llama, tmp_path, monkeypatch):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "onnx", "sparse")
    monkeypatch.setenv("SSLC_KERNELS_LIBRARY", str(tmp_path / "missing" / "libsslc_kernels.so"))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "onnx"), "--prompt", "It is", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and "make kernels" in " ".join(result.output.split())
    with pytest.raises(UserError, match="make kernels"):
        export_checkpoint_dir(ckpt, tmp_path / "again", "sparse-int4")
    assert not (tmp_path / "again").exists()


def test_profile_splits_a_decode_step_by_operator(tiny_llama, tmp_path):
    ckpt = checkpoint(tiny_llama, tmp_path / "ckpt", Pattern())
    export_checkpoint_dir(ckpt, tmp_path / "sparse", "sparse")
    result = CliRunner().invoke(app, ["profile", str(tmp_path / "sparse"), "--steps", "2", "--prompt-length", "16",
                                      "--json", str(tmp_path / "p.json"), "--report", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    ops = {op["op"]: op for op in row["ops"]}
    assert ops["SparseMatMul"]["nodes"] == 4 * 2 and row["step_ms"] > 0 and row["kernel_ms"] <= row["step_ms"]
    assert "<!-- BEGIN profile -->" in (tmp_path / "r.md").read_text()
