"""Per-family knowledge, one class per model family: where the decoder blocks are, what a block takes and how
it is wired, which Linears get compressed, what torch.onnx names their MatMuls, what onnxruntime-genai calls
the family, and whether our fused attention (sslc_export/onnx/fuse.py) computes what the family computes.

`Llama` is the base; a family that differs subclasses it and overrides what differs (optimum-onnx's one
config class per model type, at this tool's size). `architecture_for(model_type)` picks one.

A block is two pre-norm residual branches, h + body(norm(h)). Its Linears fall into *input groups*: Linears
that read the same activation (q/k/v after the attention norm; gate/up after the MLP norm) share one set of
calibration statistics, gathered once; each branch's output Linear (o, down) reads what the body computed
from the first group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from sslc_export.errors import UserError


TARGETS = ("all", "attn", "mlp")  # compress --targets: every Linear of a block, the attention branch's, the MLP's


def check_targets(targets: str) -> None:
    if targets not in TARGETS:
        raise UserError(f"unknown --targets '{targets}': choose one of {', '.join(TARGETS)}")


@dataclass(frozen=True)
class ResidualBranch:
    """h + body(norm(h)), where the body's result is its last Linear, `output`, applied to its input."""

    norm: str
    body: str
    first: tuple[str, ...]  # the Linears that read norm(h)
    output: str
    attention: bool = False  # the body takes the rotary tables and the attention mask


@dataclass
class BlockInputs:
    """Everything a decoder block needs besides its weights; `hidden` is the calibration activations."""

    hidden: torch.Tensor  # nsamples x seqlen x hidden
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None  # broadcast over the batch; None: the attention is causal by itself
    batch_size: int

    def to(self, device: torch.device) -> BlockInputs:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return BlockInputs(self.hidden.to(device), tuple(t.to(device) for t in self.position_embeddings), mask, self.batch_size)


class Llama:
    """LLaMA (SmolLM, TinyLlama, ...): separate q/k/v and gate/up Linears, rotary attention over the whole context,
    exactly the attention onnxruntime's GroupQueryAttention computes."""

    model_type = "llama"
    genai_type = "llama"  # genai_config.json's model.type: onnxruntime-genai picks its model class by it
    blocks_path = "model.layers"  # from the CausalLM to the ModuleList of decoder blocks
    branches: tuple[ResidualBranch, ...] = (  # in the order the block applies them
        ResidualBranch("input_layernorm", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       "self_attn.o_proj", attention=True),
        ResidualBranch("post_attention_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    )

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linear names grouped by shared input, in the order their inputs become available."""
        return tuple(group for branch in self.branches for group in (branch.first, (branch.output,)))

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The compressed Linears of one block, relative to the block."""
        return tuple(name for group in self.input_groups for name in group)

    def targeted(self, targets: str) -> tuple[str, ...]:
        """The Linears of one block that `compress --targets` compresses (TARGETS), in linear_names' order."""
        check_targets(targets)
        return tuple(name for branch in self.branches if targets == "all" or branch.attention == (targets == "attn")
                     for name in (*branch.first, branch.output))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def block_inputs(self, model: PreTrainedModel, tokens: torch.Tensor, hidden: torch.Tensor | None, batch_size: int) -> BlockInputs:
        """What the model computes before its first block: the token embeddings (unless `hidden` continues a resumed
        run), the rotary tables and the causal mask, for one sequence (they broadcast over any batch)."""
        inner = model.get_submodule(self.blocks_path.rpartition(".")[0])
        with torch.no_grad():
            if hidden is None:
                hidden = inner.embed_tokens(tokens)
            positions = torch.arange(tokens.shape[1]).unsqueeze(0)
            one = hidden[:1]
            position_embeddings = inner.rotary_emb(one, positions)
            mask = self.causal_mask(model.config)(
                config=model.config, input_embeds=one, attention_mask=None, cache_position=positions[0],
                past_key_values=None, position_ids=positions,
            )
        return BlockInputs(hidden, position_embeddings, mask, batch_size)

    def causal_mask(self, config: PretrainedConfig) -> Callable[..., torch.Tensor | None]:
        """The transformers mask builder the family's model uses."""
        return create_causal_mask

    def branch_kwargs(self, branch: ResidualBranch, inputs: BlockInputs) -> dict:
        """The keyword arguments a branch's body takes besides the activations."""
        if not branch.attention:
            return {}
        return {"attention_mask": inputs.attention_mask, "position_embeddings": inputs.position_embeddings}

    @property
    def onnx_block_scope(self) -> str:
        """torch.onnx's name prefix for the nodes of the decoder blocks: model.layers -> /model/layers."""
        return "/" + self.blocks_path.replace(".", "/") + "."

    def onnx_matmul_name(self, linear_name: str) -> str:
        """model.layers.3.self_attn.q_proj -> /model/layers.3/self_attn/q_proj/MatMul (torch.onnx's scope naming)."""
        parts: list[str] = []
        for part in linear_name.split("."):
            if part.isdigit() and parts:
                parts[-1] += f".{part}"
            else:
                parts.append(part)
        return "/" + "/".join(parts) + "/MatMul"

    def check_exportable(self, config: PretrainedConfig) -> None:
        """Refuse what optimum's export would get wrong without a word: longrope scaling (Phi-3 128k, ...) picks its
        short or long factors by sequence length in Python, so the traced graph keeps the short ones at every length."""
        scaling = getattr(config, "rope_scaling", None) or {}
        original = scaling.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if scaling.get("rope_type", scaling.get("type")) == "longrope" and original and original < config.max_position_embeddings:
            raise UserError(
                f"this {config.model_type} model uses longrope rotary scaling, which optimum's ONNX export cannot express: "
                f"its graph would be wrong past original_max_position_embeddings={original} of the model's "
                f"{config.max_position_embeddings} tokens, so it is not exported"
            )

    def fuses_attention(self, config: PretrainedConfig) -> bool:
        """Whether fuse.py's GroupQueryAttention (full causal context, rotary on q and k straight from their
        projections) computes this model's attention; when not, the export keeps optimum's attention."""
        return True


class Qwen2(Llama):
    """Qwen2: LLaMA with biases on q/k/v (they ride along with the Linear). Its optional sliding window
    (use_sliding_window, on some layers) is not what GroupQueryAttention is given, so such models stay unfused."""

    model_type = "qwen2"
    genai_type = "qwen2"

    def fuses_attention(self, config: PretrainedConfig) -> bool:
        return not getattr(config, "use_sliding_window", False)


class Qwen3(Qwen2):
    """Qwen3: Qwen2 without the q/k/v biases and with an RMSNorm per head on q and k (q_norm, k_norm) between the
    projections and the rotary embedding. fuse.py's GroupQueryAttention reads q and k straight from their
    projections, so the attention stays as optimum exports it (RMSNorms and the gated MLP still fuse)."""

    model_type = "qwen3"
    genai_type = "qwen3"

    def fuses_attention(self, config: PretrainedConfig) -> bool:
        return False


class Mistral(Llama):
    """Mistral: LLaMA with a sliding attention window (config.sliding_window; None in later versions). Where the
    window is narrower than the context, the attention stays unfused: fuse.py's GroupQueryAttention attends to
    the whole context."""

    model_type = "mistral"
    genai_type = "mistral"

    def causal_mask(self, config: PretrainedConfig) -> Callable[..., torch.Tensor | None]:
        return create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask

    def fuses_attention(self, config: PretrainedConfig) -> bool:
        return config.sliding_window is None or config.sliding_window >= config.max_position_embeddings


class Phi3(Mistral):
    """Phi-3: Mistral's attention and window with q, k and v in one Linear (qkv_proj, rows q|k|v) and gate and
    up in one (gate_up_proj, rows gate|up). Each fused Linear is compressed as one Linear, as the model holds
    it: the export's MatMul is then exactly that Linear's, so the rewrite finds it by name and checks its weight
    as for any other layer (splitting it would mean a model different from the one exported). The budget is
    per fused matrix (one rank for q, k and v together). fuse.py reads q, k and v from the Slices of qkv_proj,
    which it does not pack again, and does not fuse the gated MLP (its gate and up come from a Split)."""

    model_type = "phi3"
    genai_type = "phi3"
    branches = (
        ResidualBranch("input_layernorm", "self_attn", ("self_attn.qkv_proj",), "self_attn.o_proj", attention=True),
        ResidualBranch("post_attention_layernorm", "mlp", ("mlp.gate_up_proj",), "mlp.down_proj"),
    )


ARCHITECTURES: dict[str, Llama] = {family.model_type: family() for family in (Llama, Qwen2, Qwen3, Mistral, Phi3)}


def architecture_for(model_type: str) -> Llama:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"unsupported architecture '{model_type}': supported model_type values are {supported}"
        ) from None
