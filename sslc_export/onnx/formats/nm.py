"""N:M S (2:4 along the reduction axis) in the dense layout's nodes: TensorRT's sparse tensor cores
pick it up with trt_sparsity_enable; onnxruntime's own kernels see a dense MatMul."""
from __future__ import annotations

from sslc_export.onnx.formats.dense import DenseLayout


class NmLayout(DenseLayout):
    name = "nm"
    summary = "2:4 S for TensorRT's sparse tensor cores (dense MatMul elsewhere)"
    patterns = ("nm",)
    bits = (32,)
    fusable = False  # for TensorRT, which does not run onnxruntime's com.microsoft operators
