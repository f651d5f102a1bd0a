"""Micro-benchmark of the ai.sslc operators against onnxruntime's MatMul (fp32) and MatMulNBits (int4).

Per layer shape N×K and rows M, one SSLC layer at the default ratio and rank ratio (sslc_export/defaults.py;
S at 45 % density, rank r = floor(rank ratio·ratio·N·K/(N+K))) runs as SparseMatMul (fp32), SparseMatMulInt8 and SparseMatMulInt4
(group 64), the quantized ones also with int8 activations ("a8": activation_bits=8); the dense equivalent W (N×K) runs as MatMul and as MatMulNBits (int4, block 32,
accuracy_level 4). Every model holds many copies of its layer, each its own node and its own random
weights (onnxruntime shares identical initializers), so that a run's fixed overhead is small per node;
before every timed run a buffer twice the size of the last-level cache is read, so the weights come
from memory as in a real decode step (whose weights exceed the cache). A run times all copies and
reports per node; the ops of one shape and M run in turns, so a noisy machine's slow spells fall on
all of them alike. Bytes per call = weights + x + y.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sslc_export.runtimes import kernels
from sslc_export import defaults
from sslc_export.onnx.quantize import quantize_nodes
from sslc_export.report import markdown_table, update_markdown_section, write_json
from sslc_export.sparse_rows import DOMAIN, pack

# (N, K): SmolLM2's three layer shapes, a Qwen-sized one, and the shapes of SmolLM2's merged nodes (q/k/v as one
# 960-row node, gate/up as one 3072-row node; the swiglu epilogue is not part of this benchmark)
SHAPES = ((576, 576), (1536, 576), (576, 1536), (4864, 896), (960, 576), (3072, 576))
ROWS = (1, 128)
DENSITY, BUDGET, RANK_SHARE = 0.45, defaults.RATIO, defaults.RANK_RATIO
MODEL_BYTES = 64 << 20  # weights per timed run, in copies of one layer
MAX_COPIES = 256


def last_level_cache_bytes() -> int:
    """The size of CPU 0's highest-level cache (sysfs), or 32 MiB where sysfs does not say."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            sizes[int((index / "level").read_text())] = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        except (OSError, ValueError):
            continue
    return sizes[max(sizes)] if sizes else 32 << 20


EVICT_BYTES = 2 * last_level_cache_bytes()  # read before every timed run: the weights leave every cache


@dataclass
class Row:
    shape: str
    rows: int
    op: str
    us_per_call: float
    mb_per_call: float
    gb_per_s: float
    vs_matmul: float


def sslc_layer(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """S (with its mask), U, V of one layer at the benchmark's budget."""
    rng = np.random.default_rng(seed)
    rank = math.floor(RANK_SHARE * BUDGET * n * k / (n + k))
    mask = rng.random((n, k)) < DENSITY
    return (rng.standard_normal((n, k)).astype(np.float32), mask, rng.standard_normal((n, rank)).astype(np.float32),
            rng.standard_normal((rank, k)).astype(np.float32))


def _model(k: int, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "kernelbench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1),
                                                   helper.make_opsetid("com.microsoft", 1)])


def copies_for(weight_bytes: int) -> int:
    """Copies of a layer whose weights together make MODEL_BYTES."""
    return max(1, min(MAX_COPIES, math.ceil(MODEL_BYTES / weight_bytes)))


def matmul_model(n: int, k: int, bits: int) -> tuple[onnx.ModelProto, int]:
    """MatMuls of x with the dense equivalents W = S + U·V of distinct layers (MatMulNBits when bits == 4)."""
    copies = copies_for(n * k * bits // 8)
    nodes, inits = [], []
    for i in range(copies):
        s, mask, u, v = sslc_layer(n, k, seed=i)
        inits.append(numpy_helper.from_array(np.ascontiguousarray((np.where(mask, s, 0) + u @ v).T), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"matmul{i}"))
    model = _model(k, nodes, inits, [f"y{i}" for i in range(copies)])
    if bits == 4:
        model = quantize_nodes(model, 4, [node.name for node in nodes])
    return model, copies


def sparse_model(n: int, k: int, bits: int, activation_bits: int = 32) -> tuple[onnx.ModelProto, int]:
    """ai.sslc nodes on distinct layers packed with `bits`-bit values."""
    first = pack(*sslc_layer(n, k, seed=0), bits, activation_bits=activation_bits)
    copies = copies_for(first.nbytes())
    nodes, inits = [], []
    for i in range(copies):
        packed = first if i == 0 else pack(*sslc_layer(n, k, seed=i), bits, activation_bits=activation_bits)
        names = [f"c{i}.{j}" for j in range(len(packed.inputs()))]
        inits += [numpy_helper.from_array(array, name) for array, name in zip(packed.inputs(), names)]
        nodes.append(helper.make_node(packed.op_type, ["x", *names], [f"y{i}"], domain=DOMAIN, name=f"sparse{i}",
                                      **packed.attributes()))
    return _model(k, nodes, inits, [f"y{i}" for i in range(copies)]), copies


def weight_bytes(model: onnx.ModelProto, copies: int) -> int:
    return sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer) // copies


def open_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = kernels.register(ort.SessionOptions())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_models(models: dict[str, tuple[onnx.ModelProto, int]], x: np.ndarray, threads: int, seconds: float,
                evict: np.ndarray) -> dict[str, float]:
    """Median seconds per node of each model, over runs of all its copies taken in turns (forwards, then backwards,
    so that a slow spell of the machine or a run's position falls on every model alike), each run after reading
    `evict` (cold weights); about `seconds` per model."""
    sessions = {label: open_session(model, threads) for label, (model, _) in models.items()}
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {"x": x})
    samples: dict[str, list[float]] = {label: [] for label in sessions}
    order, end = list(sessions), time.perf_counter() + seconds * len(sessions)
    while time.perf_counter() < end or min(map(len, samples.values())) < 5:
        for label in order:
            evict.sum()
            start = time.perf_counter()
            sessions[label].run(None, {"x": x})
            samples[label].append(time.perf_counter() - start)
        order.reverse()
    return {label: statistics.median(samples[label]) / copies for label, (_, copies) in models.items()}


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """GB/s of one thread copying an array of `nbytes` (numpy copyto; bytes read + bytes written, best of `repeats`)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_kernel_bench(threads: int = 1, seconds: float = 1.0, shapes=SHAPES, rows=ROWS, report: Path | None = None,
                     section: str = "kernels", json_path: Path | None = None, progress=print) -> dict:
    """Times every op on every shape and row count; writes `section` of `report`."""
    results: list[Row] = []
    evict = np.ones(EVICT_BYTES // 4, np.float32)
    for n, k in shapes:
        models = {"MatMul fp32": matmul_model(n, k, 32), "MatMulNBits int4": matmul_model(n, k, 4)}
        for bits, label in ((32, "SparseMatMul fp32"), (8, "SparseMatMulInt8"), (4, "SparseMatMulInt4")):
            models[label] = sparse_model(n, k, bits)
        for bits, label in ((8, "SparseMatMulInt8 a8"), (4, "SparseMatMulInt4 a8")):
            models[label] = sparse_model(n, k, bits, activation_bits=8)
        for m in rows:
            x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
            io_bytes = (m * k + m * n) * 4
            per_call = time_models(models, x, threads, seconds, evict)
            baseline = per_call["MatMul fp32"]
            for label, (model, copies) in models.items():
                total = weight_bytes(model, copies) + io_bytes
                row = Row(f"{n}x{k}", m, label, round(per_call[label] * 1e6, 1), round(total / 1e6, 3),
                          round(total / per_call[label] / 1e9, 2), round(baseline / per_call[label], 2))
                results.append(row)
                progress(f"{row.shape} M={m} {label}: {row.us_per_call} us, {row.gb_per_s} GB/s, {row.vs_matmul}x MatMul")
    bandwidth = copy_bandwidth(EVICT_BYTES)
    summary = {"threads": threads, "isa": kernels.isa(), "copy_gb_per_s": round(bandwidth, 2),
               "cache_mib": EVICT_BYTES // 2 >> 20,
               "density": DENSITY, "budget": BUDGET, "rows": [asdict(r) for r in results]}
    write_json(json_path, summary)
    if report is not None:
        update_markdown_section(report, section, _markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    headers = ["N×K", "M", "op", "µs/call", "MB read/call", "GB/s", "speed vs MatMul"]
    rows = [[r["shape"], r["rows"], r["op"], r["us_per_call"], r["mb_per_call"], r["gb_per_s"], r["vs_matmul"]]
            for r in summary["rows"]]
    return (f"### Kernel micro-benchmark (`sslc-export kernel-bench`)\n\n"
            f"One layer at a {summary['budget']:.0%} budget (S at {summary['density']:.0%} density plus U, V) per node, "
            f"{summary['threads']} thread(s), ai.sslc kernels on {summary['isa']}; median per node over runs (taken in turns "
            f"with the other ops of the same shape and M, so the machine's slow spells fall on all alike) of "
            f"{MODEL_BYTES >> 20} MiB worth of copies of the layer (up to {MAX_COPIES}), each run after reading a buffer "
            f"twice the last-level cache ({summary['cache_mib']} MiB here), so the weights come from memory. Bytes = "
            f"weights + x + y. Copy bandwidth of this machine: {summary['copy_gb_per_s']} GB/s (one thread, numpy copy "
            f"of {2 * summary['cache_mib']} MiB, bytes read + written, best of 5).\n\n" + markdown_table(headers, rows))
