"""Writing an ONNX model of any size: inline below protobuf's 2 GB, else with its weights in
ONE external-data file next to it (model.onnx + model.onnx.data).

The decision is made from the summed sizes of the tensors the model holds, counted without
serialising anything: protobuf versions differ in what they do with a message past 2 GB
(`ByteSize()` returns a wrong number, raises ValueError, or raises EncodeError), so asking
protobuf is not a test. onnxruntime, optimum's ORTModelForCausalLM and onnxruntime-genai all
open model.onnx by path and find model.onnx.data beside it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx

PROTOBUF_LIMIT = 2 * 1024**3  # protobuf cannot serialise a message of 2 GB or more
GRAPH_MARGIN = 256 * 1024**2  # room for everything but tensor payloads: nodes, names, shapes (a few MB for a 32-layer decoder)
INLINE_LIMIT = PROTOBUF_LIMIT - GRAPH_MARGIN
EXTERNAL_THRESHOLD = 1024  # tensors of at least this many bytes go to the data file; small ones stay inline

_TYPED_FIELD_BYTES = (("float_data", 4), ("int32_data", 4), ("int64_data", 8), ("double_data", 8), ("uint64_data", 8))


def data_path(path: Path) -> Path:
    """Where save_onnx puts the external data of path."""
    return path.with_name(path.name + ".data")


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Payload size of one tensor: external (its recorded length), raw_data, or the typed fields."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in info:
            return int(info["length"])
        count = 1
        for dim in tensor.dims:
            count *= dim
        return count * max(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize, 1)
    size = len(tensor.raw_data) + sum(len(s) for s in tensor.string_data)
    for field, width in _TYPED_FIELD_BYTES:
        size += width * len(getattr(tensor, field))
    return size


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def model_tensor_bytes(model: onnx.ModelProto) -> int:
    """Summed payload of every tensor in the model (initializers, Constant values, subgraphs, functions),
    counting tensors already stored externally too: no serialisation, so it works at any size."""
    total = sum(tensor_bytes(t) for t in _graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    total += tensor_bytes(attribute.t)
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model_tensor_bytes(model) >= INLINE_LIMIT


def save_onnx(model: onnx.ModelProto, path: Path) -> bool:
    """Write model to path; past the inline limit its weights go to path + '.data' (one file).
    Returns whether external data was written. A stale data file is removed first (onnx appends to it)."""
    path = Path(path)
    data = data_path(path)
    data.unlink(missing_ok=True)
    if not needs_external_data(model):
        onnx.save_model(model, os.fspath(path))
        return False
    onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=EXTERNAL_THRESHOLD)
    return True


def load_onnx(path: Path, with_weights: bool = True) -> onnx.ModelProto:
    """Load model.onnx; with_weights pulls in external data from beside it (whatever its file names)."""
    return onnx.load(os.fspath(path), load_external_data=with_weights)
