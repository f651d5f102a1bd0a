"""Fewer bits: onnxruntime's own MatMulNBits quantizer (symmetric, so S's zeros stay exactly
zero), applied to chosen MatMuls of a graph."""
from __future__ import annotations

import logging

import onnx

QUANTIZED_FORMATS = {"int4": 4, "int8": 8}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits on CPU: the fast path onnxruntime recommends


def quantize_matmuls(model: onnx.ModelProto, bits: int, node_names: list[str] | None = None) -> onnx.ModelProto:
    """MatMulNBits for the named MatMuls (all constant-weight MatMuls when node_names is None)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits)
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
        nodes_to_include=node_names, algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model
