"""The torch module a compressed Linear becomes: y = x·Sᵀ + (x·Vᵀ)·Uᵀ + b."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SparseLowRankLinear(nn.Module):
    """S is a frozen buffer (dense in memory, zeros included); U and V are parameters so that
    recovery fine-tuning can train them as the model's own adapter."""

    def __init__(self, sparse: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = sparse.shape
        self.register_buffer("sparse", sparse.contiguous())
        self.u = nn.Parameter(u.contiguous(), requires_grad=False)
        self.v = nn.Parameter(v.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.sparse, self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.v), self.u)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_linear(parent: nn.Module, dotted_name: str, module: nn.Module) -> None:
    owner_name, _, leaf = dotted_name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, leaf, module)
