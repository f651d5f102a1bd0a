"""sslc_export.onnx.fuse on tiny random LLaMA and Qwen2 exports: the fused graph computes the same
logits as optimum's unfused one (prefill, then decode steps through our KV-cache loop), holds the fused
operators, leaves rewritten subgraphs (our custom ops, MatMulNBits) untouched, and still loads in
optimum's ORTModelForCausalLM and onnxruntime-genai."""
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoConfig

from sslc_export.runtimes.session import OnnxCausalLM
from sslc_export.onnx.build import export_checkpoint_dir, export_dense_model
from sslc_export.onnx.fuse import fuse, fused_op_counts

PROMPT = [[5, 17, 42, 99, 7, 250, 31, 64, 12, 200, 3, 77]]


def fused_copy(folder: Path, out: Path) -> Path:
    """The export stage's order: the folder's model.onnx (already rewritten/quantized) -> fuse -> save."""
    shutil.copytree(folder, out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save(fuse(model, AutoConfig.from_pretrained(folder)), str(out / "model.onnx"))
    return out


def logits_trace(folder: Path, steps: int = 4) -> list[np.ndarray]:
    """Prefill PROMPT, then `steps` greedy decode steps; every step's logits."""
    runtime = OnnxCausalLM(folder, threads=1)
    past, ids, trace = runtime.empty_past(), np.array(PROMPT), []
    for _ in range(steps + 1):
        logits, past = runtime.step(ids, past)
        trace.append(logits)
        ids = np.array([[int(logits[0, -1].argmax())]])
    return trace


def assert_same_logits(reference: list[np.ndarray], fused: list[np.ndarray], rtol: float) -> None:
    for step, (a, b) in enumerate(zip(reference, fused)):
        scale = float(np.abs(a).max()) or 1.0
        assert np.abs(a - b).max() <= rtol * scale, f"step {step}: max |diff| {np.abs(a - b).max()} (scale {scale})"


@pytest.fixture(scope="module")
def dense_export(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "onnx"
    export_dense_model(str(tiny_model), out, graph="optimum")  # the unfused graph these tests fuse themselves
    return out


def test_fused_graph_gives_the_same_logits(dense_export, tmp_path):
    fused = fused_copy(dense_export, tmp_path / "fused")
    assert_same_logits(logits_trace(dense_export), logits_trace(fused), rtol=1e-5)

    config = AutoConfig.from_pretrained(dense_export)
    layers = config.num_hidden_layers
    model = onnx.load(str(fused / "model.onnx"))
    assert fused_op_counts(model) == {"GroupQueryAttention": layers, "SimplifiedLayerNormalization": 1,
                                      "SkipSimplifiedLayerNormalization": 2 * layers, "packed_qkv": layers, "swiglu": 0}
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Softmax"] == ops["Pow"] == ops["Cast"] - 2 == 0  # nothing of the unfused attention or RMSNorm is left
    assert ops["MatMul"] == 5 * layers + 1  # per layer one packed q/k/v MatMul, o, gate, up, down; and the lm_head
    original = onnx.load(str(dense_export / "model.onnx"), load_external_data=False)
    for a, b in ((original.graph.input, model.graph.input), (original.graph.output, model.graph.output)):
        assert [v.name for v in a] == [v.name for v in b]  # same interface: the runtimes feed it unchanged


def test_optimum_and_genai_load_the_fused_folder(dense_export, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from sslc_export.runtimes.genai import GenaiCausalLM

    fused = fused_copy(dense_export, tmp_path / "fused")
    ids = torch.tensor(PROMPT)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    expected = ORTModelForCausalLM.from_pretrained(dense_export).generate(**kwargs)
    assert torch.equal(ORTModelForCausalLM.from_pretrained(fused).generate(**kwargs), expected)
    tokens, _ = GenaiCausalLM(fused, threads=1).greedy(PROMPT[0], 6)
    assert tokens == expected[0, len(PROMPT[0]):len(PROMPT[0]) + len(tokens)].tolist()


def test_custom_operator_nodes_pass_through_untouched(dense_export):
    """A node onnxruntime cannot run (an unregistered ai.sslc operator in place of each q_proj) does not
    stop the fusion, and comes out byte for byte as it went in: the fusion needs no session."""
    model = onnx.load(str(dense_export / "model.onnx"))
    opaque = []
    for i, node in enumerate(model.graph.node):
        if node.name.endswith("/q_proj/MatMul"):
            stand_in = onnx.helper.make_node("SparseRowsMatMul", list(node.input), list(node.output),
                                             name=node.name + "_sparse", domain="ai.sslc", bits=32)
            model.graph.node[i].CopyFrom(stand_in)
            opaque.append(stand_in.SerializeToString())
    model.opset_import.append(onnx.helper.make_opsetid("ai.sslc", 1))
    config = AutoConfig.from_pretrained(dense_export)
    fused = fuse(model, config)
    counts = fused_op_counts(fused)
    assert counts["GroupQueryAttention"] == config.num_hidden_layers and counts["packed_qkv"] == 0
    kept = [node.SerializeToString() for node in fused.graph.node if node.domain == "ai.sslc"]
    assert sorted(kept) == sorted(opaque) and len(opaque) == config.num_hidden_layers


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory) -> Path:
    from sslc_export.compress import CompressJob, compress
    from sslc_export.methods import Settings

    ckpt = tmp_path_factory.mktemp("fuse-ckpt") / "ckpt"
    compress(CompressJob(out=ckpt, model=str(tiny_llama), ratio=0.4, settings=Settings(iters=2), nsamples=4, seqlen=32, batch_size=4))
    return ckpt


@pytest.mark.parametrize("fmt", ["joined-int4", "sparse"])
def test_rewritten_formats_fuse_after_the_rewrite(checkpoint, tmp_path, fmt):
    from sslc_export.runtimes import kernels

    if fmt == "sparse" and not kernels.availability()[0]:
        pytest.skip(kernels.availability()[1])
    export_checkpoint_dir(checkpoint, tmp_path / "onnx", fmt, graph="optimum")
    before = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    fused = fused_copy(tmp_path / "onnx", tmp_path / "fused")
    after = onnx.load(str(fused / "model.onnx"))
    counts = fused_op_counts(after)
    if fmt == "sparse":
        # q/k/v and gate/up(+silu) merge into one ai.sslc node each: with o and down, 4 per layer
        assert counts["GroupQueryAttention"] == counts["packed_qkv"] == counts["swiglu"] == 2
        assert Counter(n.op_type for n in after.graph.node if n.domain == "ai.sslc") == {"SparseMatMul": 8}
        assert not {"Sigmoid", "QuickGelu"} & {n.op_type for n in after.graph.node}
        # exact fp32 S, U, V: the unfused dense-format export of the same checkpoint is the reference
        export_checkpoint_dir(checkpoint, tmp_path / "reference", "dense", graph="optimum")
        assert_same_logits(logits_trace(tmp_path / "reference"), logits_trace(fused), rtol=1e-4)
        return
    untouched = lambda m: sorted(n.SerializeToString() for n in m.graph.node if n.op_type == "MatMulNBits")  # noqa: E731
    assert untouched(before) and untouched(after) == untouched(before)
    assert counts["GroupQueryAttention"] == 2 and counts["packed_qkv"] == 0  # each projection keeps its own S, U, V
    # MatMulNBits (accuracy level 4) quantizes its activations to int8: fused norms move them by rounding
    assert_same_logits(logits_trace(tmp_path / "onnx"), logits_trace(fused), rtol=2e-2)
