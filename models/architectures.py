"""Per-architecture knowledge: where the decoder blocks are, how a block is wired, and
which Linears it holds.

A LLaMA-style block is two pre-norm residual branches, h + body(norm(h)). Its Linears fall
into *input groups*: Linears that read the same activation (q/k/v after the attention norm;
gate/up after the MLP norm) share one set of calibration statistics, gathered once; each
branch's output Linear (o, down) reads what the body computed from the first group.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sslc_export.errors import UserError


@dataclass(frozen=True)
class ResidualBranch:
    """h + body(norm(h)), where the body's result is its last Linear, `output`, applied to its input."""

    norm: str
    body: str
    first: tuple[str, ...]  # the Linears that read norm(h)
    output: str
    attention: bool = False  # the body takes the rotary tables and the attention mask


@dataclass(frozen=True)
class Architecture:
    model_type: str
    blocks_path: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    branches: tuple[ResidualBranch, ...]  # in the order the block applies them

    @property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linear names grouped by shared input, in the order their inputs become available."""
        return tuple(group for branch in self.branches for group in (branch.first, (branch.output,)))

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)


_LLAMA_LIKE_BRANCHES = (
    ResidualBranch(
        "input_layernorm", "self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
        attention=True,
    ),
    ResidualBranch("post_attention_layernorm", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
)

ARCHITECTURES: dict[str, Architecture] = {
    # Qwen2 differs from LLaMA only by biases on q/k/v, which ride along with the Linear.
    name: Architecture(name, "model.layers", _LLAMA_LIKE_BRANCHES)
    for name in ("llama", "qwen2", "mistral")
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"unsupported architecture '{model_type}': supported model_type values are {supported}"
        ) from None
