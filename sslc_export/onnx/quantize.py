"""Fewer bits through onnxruntime's own quantizer: MatMulNBits for chosen MatMuls and
GatherBlockQuantized for the embedding, symmetric (so S's zeros stay exactly zero), applied to
exactly the nodes named — the quantizer's own op-type filter would take every constant MatMul.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from sslc_export.errors import UserError

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on CPU: the fast path onnxruntime recommends
LM_HEAD_CHOICES = ("fp32", "int8", "int4")
DECODER_SCOPE = "/model/layers."  # torch.onnx's scope for the decoder blocks


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


def _reads_constant(node: onnx.NodeProto, index: int, initializers: set[str]) -> bool:
    return len(node.input) > index and node.input[index] in initializers


def decoder_matmuls(model: onnx.ModelProto) -> list[str]:
    """Every constant-weight MatMul inside the decoder blocks (what the dense int4/int8 baselines quantize)."""
    initializers = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and node.name.startswith(DECODER_SCOPE) and _reads_constant(node, 1, initializers)]


def head_and_embedding(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The lm_head MatMul (it writes the `logits` output) and the token-embedding Gather (it reads `input_ids`)."""
    initializers = {init.name for init in model.graph.initializer}
    heads = [node.name for node in model.graph.node
             if node.op_type == "MatMul" and "logits" in node.output and _reads_constant(node, 1, initializers)]
    embeddings = [node.name for node in model.graph.node
                  if node.op_type == "Gather" and node.input[1:2] == ["input_ids"] and _reads_constant(node, 0, initializers)]
    return heads, embeddings


def _materialize_tied_head(model: onnx.ModelProto) -> None:
    """A tied lm_head reads Transpose(embedding) at run time; give it a constant transposed copy so it can be quantized."""
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


def check_lm_head(choice: str) -> None:
    if choice not in LM_HEAD_CHOICES:
        raise UserError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, not {choice}")


def quantize_head(model: onnx.ModelProto, choice: str) -> onnx.ModelProto:
    """The same lm_head and embedding precision for every format and baseline of a comparison."""
    check_lm_head(choice)
    if choice == "fp32":
        return model
    _materialize_tied_head(model)
    heads, embeddings = head_and_embedding(model)
    return quantize_nodes(model, int(choice.removeprefix("int")), heads, embeddings)
