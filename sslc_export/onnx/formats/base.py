"""What a format is: a layout (how S, U and V sit in the graph) times bits (how their values
are stored). A layout builds the nodes that replace one `MatMul(x, Wᵀ)` of a compressed Linear,
y = x·Sᵀ + (x·Vᵀ)·Uᵀ; the rewrite stage splices them in where the MatMul was.

Layouts made of standard MatMuls are quantized afterwards by onnxruntime's MatMulNBits quantizer
(on exactly the MatMuls the layout names); a layout that stores its own integers (the sparse
one) quantizes inside its builder and says so with `quantizes_itself`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from sslc_export.quantization import Grid, Quantized, QuantizedFactors


if TYPE_CHECKING:
    from sslc_export.checkpoint import CompressedTensors

ANY_PATTERN = ("unstructured", "nm", "structured")
MICROSOFT_DOMAIN = "com.microsoft"
FP32_RTOL = 1e-5
# MatMulNBits differs from the fp32 checkpoint by construction (accuracy_level 4 also quantizes the
# activations): these bounds only catch a broken graph; quality is judged by perplexity (`bench`).
MATMULNBITS_RTOL = {8: 1.5e-1, 4: 8e-1}


@dataclass
class Subgraph:
    """Nodes and initializers for one Linear; every node is named under the Linear's prefix."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    matmuls: list[str] = field(default_factory=list)  # names of the MatMuls that carry weights (what bits apply to)
    domains: dict[str, int] = field(default_factory=dict)  # custom opset domains the nodes use

    def constant(self, suffix: str, array: np.ndarray) -> str:
        name = f"{self.prefix}.{suffix}"
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None, suffix: str, domain: str = "", **attributes) -> str:
        """Add a node named PREFIX/SUFFIX; its output is `output` (a name outside the subgraph) or PREFIX/SUFFIX."""
        name = f"{self.prefix}/{suffix}"
        output = output or name
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, domain=domain, **attributes))
        return output

    def matmul(self, x: str, weight_t: np.ndarray, output: str | None, suffix: str) -> str:
        result = self.op("MatMul", [x, self.constant(f"{suffix}_T", weight_t)], output, suffix)
        self.matmuls.append(f"{self.prefix}/{suffix}")
        return result

    def product(self, x: str, values: torch.Tensor, integers: Quantized | None, grid: Grid | None, output: str | None,
                suffix: str) -> str:
        """x·valuesᵀ (values [out, in]): MatMulNBits holding a quantized checkpoint's own integers and scales when
        `integers` is given (no second rounding), else a MatMul of the fp32 values (MatMulNBits' quantizer may take it)."""
        if integers is None:
            return self.matmul(x, values.T.numpy(), output, suffix)
        from sslc_export.onnx.quantize import ACCURACY_LEVEL, matmulnbits_weights

        rows, cols = integers.q.shape
        packed, scales = matmulnbits_weights(integers.q.numpy(), integers.scales.numpy(), grid.bits, grid.group_size)
        self.domains[MICROSOFT_DOMAIN] = 1
        return self.op("MatMulNBits", [x, self.constant(f"{suffix}_Q{grid.bits}", packed), self.constant(f"{suffix}_scales", scales)],
                       output, suffix, domain=MICROSOFT_DOMAIN, K=cols, N=rows, bits=grid.bits, block_size=grid.group_size,
                       accuracy_level=ACCURACY_LEVEL)


def low_rank_to_write(layer: CompressedTensors, integers: QuantizedFactors | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) as a layout writes them: with a quantized checkpoint's `integers`, its own values (compress balanced
    them before putting them on the grid); else balanced, so that quantized formats keep every rank-1 term."""
    if integers is not None:
        return layer.u, layer.v
    from sslc_export.lowrank import balance

    return balance(layer.u, layer.v)


def checkpoint_integers(layer: CompressedTensors, bits: int) -> QuantizedFactors | None:
    """A quantized checkpoint's integers, when the format writes them (bits != 32); None: write fp32 values."""
    return layer.quantized if bits != 32 else None


def has_low_rank(layer: CompressedTensors) -> bool:
    return layer.u.shape[1] > 0


class Layout(ABC):
    """How one compressed Linear becomes ONNX nodes. Adding one: a new file and a registry line."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    patterns: ClassVar[tuple[str, ...]] = ANY_PATTERN  # checkpoint patterns it can express
    bits: ClassVar[tuple[int, ...]] = (32, 8, 4)
    quantizes_itself: ClassVar[bool] = False  # True: bits are applied inside build(), not by MatMulNBits
    writes_integers: ClassVar[bool] = False  # True: a quantized checkpoint's integers are written as they are (bits = its own)
    custom_domain: ClassVar[str | None] = None  # an opset domain whose ops need our kernel library
    fusable: ClassVar[bool] = True  # the export fuses attention and norms into onnxruntime's contrib ops around it

    @abstractmethod
    def build(self, graph: Subgraph, x: str, output: str, layer: CompressedTensors, bits: int) -> None:
        """Add the nodes computing `output` = x·Sᵀ + (x·Vᵀ)·Uᵀ to graph."""

    def reference(self, layer: CompressedTensors, bits: int) -> CompressedTensors:
        """The factors this layout's ONNX computes exactly (up to fp32 rounding); the checkpoint's own for fp32."""
        return layer

    def rtol(self, bits: int) -> float:
        return FP32_RTOL if bits == 32 or self.quantizes_itself else MATMULNBITS_RTOL[bits]

    def quantization(self, bits: int) -> dict | None:
        """What export.json records about how values were quantized."""
        if bits == 32:
            return None
        from sslc_export.onnx.quantize import ACCURACY_LEVEL, BLOCK_SIZE

        return {"bits": bits, "kernel": "MatMulNBits", "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL, "symmetric": True}
