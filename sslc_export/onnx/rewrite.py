"""The MatMul rewrite: each MatMul whose weight belongs to a compressed Linear becomes the
subgraph of the chosen format.

A MatMul is found by its node name (the family's `onnx_matmul_name`: torch.onnx names it after the module path) and then
checked by weight identity: its initializer must equal (S + U·V)ᵀ. Any layer not found or
not matching is an error, never a silent skip.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sslc_export.models.architectures import Llama
from sslc_export.checkpoint import CompressedTensors
from sslc_export.errors import UserError
from sslc_export.onnx.formats import Format


@dataclass
class Rewritten:
    model: onnx.ModelProto
    matmuls: list[str] = field(default_factory=list)  # the weight MatMuls the format placed (what MatMulNBits may quantize)


def rewrite(model: onnx.ModelProto, layers: dict[str, CompressedTensors], fmt: Format, architecture: Llama,
            rtol: float = 1e-4) -> Rewritten:
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    position = {node.name: i for i, node in enumerate(graph.node)}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    retired: set[str] = set()
    result = Rewritten(model)
    domains: dict[str, int] = {}
    for name, layer in layers.items():
        node_name = architecture.onnx_matmul_name(name)
        if node_name not in position:
            raise UserError(f"rewrite found no MatMul named {node_name} for compressed layer {name}: the ONNX graph does not match the checkpoint")
        node = graph.node[position[node_name]]
        weight_name = node.input[1]
        if weight_name not in initializers:
            raise UserError(f"MatMul {node_name} has no constant weight: cannot rewrite layer {name}")
        weight = numpy_helper.to_array(initializers[weight_name])
        expected = (layer.sparse + layer.u @ layer.v).T.numpy()
        scale = float(np.abs(expected).max()) or 1.0
        if weight.shape != expected.shape or not np.allclose(weight, expected, rtol=0, atol=rtol * scale):
            raise UserError(f"the weight of {node_name} is not S + U·V of layer {name}: ONNX model and checkpoint do not match")
        subgraph = fmt.build(name, node.input[0], node.output[0], layer)
        replacements[position[node_name]] = subgraph.nodes
        graph.initializer.extend(subgraph.initializers)
        result.matmuls.extend(subgraph.matmuls)
        domains.update(subgraph.domains)
        retired.add(weight_name)
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacements.get(i, [node]))
    still_used = {name for node in nodes for name in node.input}
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name not in retired or init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    known = {opset.domain for opset in model.opset_import}
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in domains.items() if domain not in known)
    return result
