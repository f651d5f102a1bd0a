"""One MatMul for both branches: Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]. Per Linear that is two MatMuls and a
Concat instead of three MatMuls and an Add: at batch-1 decode a node costs about as much as its bytes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sslc_export.onnx.formats.base import Layout, Subgraph, checkpoint_integers, has_low_rank, low_rank_to_write
from sslc_export.quantization import Quantized, QuantizedFactors

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def add_joined(graph: Subgraph, x: str, x_sparse: str, sparse: torch.Tensor, layer: CompressedTensors, output: str,
               integers: QuantizedFactors | None = None) -> None:
    """output = x_sparse·sparseᵀ + (x·Vᵀ)·Uᵀ, the sparse side and Uᵀ in one product on the concatenated inputs.
    With a quantized checkpoint's `integers` every product holds them as they are ([S | U] as one grid matrix:
    whole groups on each side, since export checks that the group size divides the input width)."""
    grid = integers.grid if integers is not None else None
    if not has_low_rank(layer):
        graph.product(x_sparse, sparse, integers.sparse if integers is not None else None, grid, output, "S")
        return
    u, v = low_rank_to_write(layer, integers)
    if integers is None:
        v_integers = both_integers = None
    else:
        v_integers = integers.v
        both_integers = Quantized(torch.cat([integers.sparse.q, integers.u.q], dim=1),
                                  torch.cat([integers.sparse.scales, integers.u.scales], dim=1))
    projected = graph.product(x, v, v_integers, grid, None, "V")
    joined = graph.op("Concat", [x_sparse, projected], None, "joined", axis=-1)
    graph.product(joined, torch.cat([sparse, u], dim=1), both_integers, grid, output, "SU")


class JoinedLayout(Layout):
    name = "joined"
    summary = "S dense, sharing one MatMul with Uᵀ: Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]"
    writes_integers = True

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        add_joined(graph, x, x, layer.sparse, layer, output, checkpoint_integers(layer, bits))
