"""Per-architecture knowledge: where the decoder blocks are and which Linears they hold.

A block's Linears are listed in *input groups*: Linears that read the same activation
(q/k/v after the attention norm; gate/up after the MLP norm) share one set of
calibration statistics, gathered once.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sslc_export.errors import UserError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    blocks_path: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    input_groups: tuple[tuple[str, ...], ...]  # Linear names inside a block, grouped by shared input

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)


_LLAMA_LIKE_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

ARCHITECTURES: dict[str, Architecture] = {
    # Qwen2 differs from LLaMA only by biases on q/k/v, which ride along with the Linear.
    name: Architecture(name, "model.layers", _LLAMA_LIKE_GROUPS)
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
