"""Model families beyond the LLaMA / Qwen2 fixtures, each a tiny random model with random biases and norm weights:
compress -> checkpoint -> export (dense, sparse) -> validate against the checkpoint (prefill and decode logits),
what each family's class says about its graph (compressed Linears, fused attention or not, genai's model type),
and one clear error for a family we do not support."""
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.models.architectures import ARCHITECTURES, architecture_for
from sslc_export.models.synthetic import build_random_model
from sslc_export.checkpoint import load_checkpoint, read_manifest
from sslc_export.compress import CompressJob, compress
from sslc_export.errors import UserError
from sslc_export.methods import Settings
from sslc_export.onnx.build import export_checkpoint_dir, export_dense_model
from sslc_export.onnx.genai import GENAI_CONFIG
from sslc_export.onnx.validate import PROMPTS, validate

# (model_type, config overrides, GroupQueryAttentions expected in the fused export of the two-layer model)
FAMILIES = {
    "qwen3": ("qwen3", {}, 0),  # q/k RMSNorms before the rotary embedding: attention left as optimum exports it
    "mistral": ("mistral", {}, 2),  # its 4096 window is wider than the 256-token context
    "phi3": ("phi3", {}, 2),  # fused qkv_proj / gate_up_proj, each compressed as one Linear
    "llama-biased": ("llama", {"attention_bias": True, "mlp_bias": True}, 2),  # a bias on every compressed Linear
}


class Family(NamedTuple):
    model_type: str
    model: Path  # the random Hugging Face folder
    ckpt: Path  # its checkpoint
    attentions: int  # GroupQueryAttentions expected in the fused export


def small_checkpoint(model: Path, out: Path, streaming: bool = False) -> Path:
    compress(CompressJob(out=out, model=str(model), ratio=0.4, settings=Settings(iters=3), nsamples=4, seqlen=32, batch_size=4,
                         streaming=streaming))
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    model_type, overrides, attentions = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = build_random_model(root / "hf", model_type, **overrides)
    return Family(model_type, model, small_checkpoint(model, root / "ckpt"), attentions)


def test_block_walk_reproduces_the_block_forward(family):
    """The calibration walk (the family's branches, block inputs and attention kwargs) equals the block's own forward."""
    from sslc_export.models.loading import load_model
    from sslc_export.blockwalk import walk_block

    loaded = load_model(str(family.model))
    tokens = torch.randint(0, loaded.model.config.vocab_size, (3, 16))
    inputs = loaded.architecture.block_inputs(loaded.model, tokens, None, batch_size=2)
    block = loaded.architecture.blocks(loaded.model)[0]
    with torch.no_grad():
        expected = block(inputs.hidden, **loaded.architecture.branch_kwargs(loaded.architecture.branches[0], inputs))
    expected = expected[0] if isinstance(expected, tuple) else expected
    groups = []
    actual = walk_block(block, loaded.architecture, inputs, lambda names, stats: groups.append(names))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert tuple(groups) == loaded.architecture.input_groups


def test_streaming_gives_the_same_checkpoint(family, tmp_path):
    streamed = read_manifest(small_checkpoint(family.model, tmp_path / "streamed", streaming=True))
    for name, entry in read_manifest(family.ckpt)["files"].items():
        if name.startswith("blocks/") or name == "dense.safetensors":
            assert streamed["files"][name]["sha256"] == entry["sha256"], name


def test_checkpoint_holds_the_family_linears(family):
    model_type, _, ckpt, _ = family
    architecture = architecture_for(model_type)
    manifest = read_manifest(ckpt)
    assert manifest["model_type"] == model_type
    expected = {f"{architecture.blocks_path}.{i}.{name}" for i in range(manifest["num_blocks"]) for name in architecture.linear_names}
    assert {layer["name"] for layer in manifest["layers"]} == expected
    assert manifest["params_kept"] <= 0.6 * manifest["params_total"] + len(expected)
    if model_type == "phi3":
        assert architecture.linear_names == ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_export_validates_against_the_checkpoint(family, tmp_path, fmt):
    model_type, _, ckpt, attentions = family
    architecture = architecture_for(model_type)
    record = export_checkpoint_dir(ckpt, tmp_path / "onnx", fmt)
    config = json.loads((ckpt / "config.json").read_text())
    assert record["compressed_layers"] == config["num_hidden_layers"] * len(architecture.linear_names)
    assert record["graph"]["kind"] == "fused" and record["graph"]["GroupQueryAttention"] == attentions
    norms_per_layer = 4 if model_type == "qwen3" else 0  # q_norm and k_norm as SimplifiedLayerNormalization
    assert record["graph"]["SimplifiedLayerNormalization"] == 1 + norms_per_layer // 2 * config["num_hidden_layers"]
    assert json.loads((tmp_path / "onnx" / GENAI_CONFIG).read_text())["model"]["type"] == architecture.genai_type
    report = validate(tmp_path / "onnx", load_checkpoint(ckpt)[0])
    assert report.passed, report


def test_onnxruntime_genai_runs_the_family_folder(family, tmp_path):
    """genai_config.json's model type is one onnxruntime-genai knows, and genai decodes what our loop decodes."""
    import numpy as np

    from sslc_export.runtimes.genai import GenaiCausalLM
    from sslc_export.runtimes.session import OnnxCausalLM

    export_checkpoint_dir(family.ckpt, tmp_path / "onnx", "dense")
    ids = [5, 17, 42, 99, 7, 250, 31, 64]
    runtime = OnnxCausalLM(tmp_path / "onnx")
    ours, past, step = [], runtime.empty_past(), np.array([ids])
    for _ in range(6):
        logits, past = runtime.step(step, past)
        ours.append(int(logits[0, -1].argmax()))
        step = np.array([[ours[-1]]])
    tokens, _ = GenaiCausalLM(tmp_path / "onnx", threads=1).greedy(ids, 6)
    assert tokens and tokens == ours[: len(tokens)]


def test_a_window_narrower_than_the_context_keeps_optimums_attention(tmp_path):
    """GroupQueryAttention as fuse.py builds it attends to the whole context: a Mistral whose sliding window is
    shorter than the validation prompts must keep optimum's (windowed) attention and still match PyTorch."""
    model = build_random_model(tmp_path / "hf", "mistral", sliding_window=6)
    ckpt = small_checkpoint(model, tmp_path / "ckpt")
    reference = load_checkpoint(ckpt)[0]
    assert max(len(reference.tokenizer(prompt).input_ids) for prompt in PROMPTS) > 6
    record = export_checkpoint_dir(ckpt, tmp_path / "onnx", "dense")
    assert record["graph"]["GroupQueryAttention"] == 0
    assert validate(tmp_path / "onnx", reference).passed


def test_longrope_is_refused_before_anything_is_written(tmp_path):
    """optimum traces one branch of longrope (the short factors): measured here, its graph matches PyTorch within
    original_max_position_embeddings and is off by ~1e-2 relative past it. A clear error, not a wrong model."""
    half = 8  # head_dim / 2
    rope = {"type": "longrope", "short_factor": [1.0] * half, "long_factor": [4.0] * half}
    model = build_random_model(tmp_path / "hf", "phi3", rope_scaling=rope, original_max_position_embeddings=32)
    out = tmp_path / "onnx"
    with pytest.raises(UserError, match="longrope.*original_max_position_embeddings=32 of the model's 256 tokens"):
        export_dense_model(str(model), out)
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))


def test_synthetic_models_have_random_biases_and_norms(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_random_model(tmp_path / "qwen3", "qwen3", attention_bias=True))
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias.abs().min() > 0 and attention.o_proj.bias.abs().min() > 0
    for norm in (attention.q_norm, attention.k_norm, model.model.layers[0].input_layernorm, model.model.norm):
        assert not torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_optimum_exports_every_supported_family():
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers optimum's ONNX configs with the TasksManager)
    from optimum.exporters.tasks import TasksManager

    for model_type in ARCHITECTURES:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        assert "text-generation-with-past" in tasks, model_type


def test_unsupported_family_is_one_line_naming_the_supported_ones(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    supported = ", ".join(sorted(ARCHITECTURES))
    for command in (["export", "--dense", str(folder)], ["compress", "--model", str(folder), "--out"]):
        out = tmp_path / "out"
        result = CliRunner().invoke(app, [*command, str(out)])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if "error" in line]
        assert errors == [f"error: unsupported architecture 'gpt2': supported model_type values are {supported}"], result.output
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(UserError, match=supported):
        export_dense_model(str(folder), tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
