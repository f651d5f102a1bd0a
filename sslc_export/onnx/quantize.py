"""Fewer bits through onnxruntime's own quantizer: MatMulNBits for chosen MatMuls and
GatherBlockQuantized for the embedding, symmetric (so S's zeros stay exactly zero), applied to
exactly the nodes named — the quantizer's own op-type filter would take every constant MatMul.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sslc_export.errors import UserError

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on CPU: the fast path onnxruntime recommends
LM_HEAD_CHOICES = ("fp32", "int8", "int4")


def quantize_nodes(model: onnx.ModelProto, bits: int, matmuls: list[str], gathers: list[str] = ()) -> onnx.ModelProto:
    """MatMulNBits for the named MatMuls, GatherBlockQuantized for the named Gathers; nothing else changes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if not matmuls and not gathers:
        return model
    include = {*matmuls, *gathers}
    exclude = [node.name for node in model.graph.node if node.op_type in ("MatMul", "Gather") and node.name not in include]
    op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits,
                                          op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                     nodes_to_exclude=exclude, nodes_to_include=sorted(include), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def matmulnbits_weights(q: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's symmetric integers q ([N, K], in [-2^(bits-1), 2^(bits-1) - 1]) and scales ([N, K / block_size],
    one per row and block of K) as MatMulNBits' B ([N, blocks, block_size·bits/8], offset by the implicit zero point
    2^(bits-1), padded with zeros to whole blocks, two 4-bit values per byte low first) and flat scales."""
    rows, cols = q.shape
    blocks = -(-cols // block_size)
    if scales.shape != (rows, blocks):
        raise UserError(f"scales of shape {tuple(scales.shape)} do not fit a {rows}x{cols} matrix in blocks of {block_size}")
    zero_point = 1 << (bits - 1)
    offset = np.full((rows, blocks * block_size), zero_point, np.uint8)
    offset[:, :cols] = q.astype(np.int16) + zero_point
    packed = offset if bits == 8 else offset[:, 0::2] | (offset[:, 1::2] << 4)
    return packed.reshape(rows, blocks, block_size * bits // 8), scales.astype(np.float32).reshape(-1)


def _reads_constant(node: onnx.NodeProto, index: int, initializers: set[str]) -> bool:
    return len(node.input) > index and node.input[index] in initializers


def decoder_matmuls(model: onnx.ModelProto, block_scope: str) -> list[str]:
    """Every constant-weight MatMul inside the decoder blocks, whose node names start with `block_scope` (the
    family's onnx_block_scope): what the dense int4/int8 baselines quantize."""
    initializers = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.name.startswith(block_scope) and _reads_constant(node, 1, initializers)]


def head_and_embedding(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The lm_head MatMul (it writes the `logits` output) and the token-embedding Gather (it reads `input_ids`)."""
    initializers = {init.name for init in model.graph.initializer}
    heads = [node.name for node in model.graph.node
             if node.op_type == "MatMul" and "logits" in node.output and _reads_constant(node, 1, initializers)]
    embeddings = [node.name for node in model.graph.node
                  if node.op_type == "Gather" and node.input[1:2] == ["input_ids"] and _reads_constant(node, 0, initializers)]
    return heads, embeddings


def _materialize_tied_head(model: onnx.ModelProto) -> str | None:
    """A tied lm_head reads Transpose(embedding) at run time; give it a constant transposed copy so it can be
    quantized. Returns the embedding's initializer name when the head was tied."""
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        if node.op_type != "MatMul" or "logits" not in node.output:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        name = f"{transpose.input[0]}.lm_head_T"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.input[1] = name
        if not any(transpose.output[0] in other.input for other in model.graph.node):
            model.graph.node.remove(transpose)
        return transpose.input[0]
    return None


def _share_tied_embedding(model: onnx.ModelProto, embedding: str, bits: int) -> bool:
    """The token embedding read from the quantized lm_head's own bytes (GatherBlockQuantized over a Reshape of
    MatMulNBits' weight and scales), as onnxruntime-genai's builder does for tied models: one quantized copy
    on disk instead of two, and embedding and head stay tied. False (nothing changed) if the graph differs."""
    initializers = {init.name: init for init in model.graph.initializer}
    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[:1] == [embedding] and n.input[1:2] == ["input_ids"]]
    if head is None or len(head.input) != 3 or len(gathers) != 1 or any(i not in initializers for i in head.input[1:]):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    rows, cols, block = attrs["N"], attrs["K"], attrs["block_size"]
    gather = gathers[0]
    shapes = {"data": [rows, cols * bits // 8], "scales": [rows, -(-cols // block)]}
    inputs = []
    for role, source in zip(("data", "scales"), head.input[1:]):
        shape = f"{gather.name}/{role}_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(shapes[role], np.int64), shape))
        model.graph.node.append(helper.make_node("Reshape", [source, shape], [f"{gather.name}/{role}"], name=f"{gather.name}/Reshape_{role}"))
        inputs.append(f"{gather.name}/{role}")
    shared = helper.make_node("GatherBlockQuantized", [inputs[0], "input_ids", inputs[1]], list(gather.output),
                              name=gather.name + "_shared", domain="com.microsoft", bits=bits, block_size=block,
                              gather_axis=0, quantize_axis=1)
    index = list(model.graph.node).index(gather)
    model.graph.node.remove(gather)
    model.graph.node.insert(index, shared)
    if not any(embedding in node.input for node in model.graph.node):
        model.graph.initializer.remove(initializers[embedding])
    return True


def check_lm_head(choice: str) -> None:
    if choice not in LM_HEAD_CHOICES:
        raise UserError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, not {choice}")


def quantize_head(model: onnx.ModelProto, choice: str) -> onnx.ModelProto:
    """The same lm_head and embedding precision for every format and baseline of a comparison."""
    check_lm_head(choice)
    if choice == "fp32":
        return model
    bits = int(choice.removeprefix("int"))
    tied = _materialize_tied_head(model)
    heads, embeddings = head_and_embedding(model)
    if tied is None or not heads:
        return quantize_nodes(model, bits, heads, embeddings)
    model = quantize_nodes(model, bits, heads)
    if not _share_tied_embedding(model, tied, bits):
        model = quantize_nodes(model, bits, [], head_and_embedding(model)[1])
    return model
