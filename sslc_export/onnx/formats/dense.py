"""S stored dense, zeros included, plus the two thin MatMuls: the reference every other layout is checked against."""
from __future__ import annotations

from typing import TYPE_CHECKING

from sslc_export.onnx.formats.base import Layout, Subgraph, factors_t, has_low_rank

if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors


def add_low_rank(graph: Subgraph, x: str, layer: CompressedTensors) -> str:
    v_t, u_t = factors_t(layer)
    hidden = graph.matmul(x, v_t, None, "V")
    return graph.matmul(hidden, u_t, None, "U")


class DenseLayout(Layout):
    name = "dense"
    summary = "S stored dense (zeros included) + two thin MatMuls: the reference"

    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        if not has_low_rank(layer):
            graph.matmul(x, layer.sparse.T.numpy(), output, "S")
            return
        sparse = graph.matmul(x, layer.sparse.T.numpy(), None, "S")
        graph.op("Add", [sparse, add_low_rank(graph, x, layer)], output, "sum")
