"""The ai.sslc operators (runtimes/kernels) against the NumPy reference, on every kernel path.

Each case is a one-node ONNX model run by a real onnxruntime session with the library registered;
SSLC_KERNEL_ISA forces the scalar, AVX2 and AVX-512 paths in turn. Malformed weights must be
refused at session creation with a clear message. In CI a missing library fails instead of skipping.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sslc_export.runtimes import kernels
from sslc_export.errors import UserError
from sslc_export.sparse_rows import (DOMAIN, SparseRows, activation_quantize, dequantize, merge, pack, quantized_product,
                                     reference)

ISAS = ["scalar", "avx2", "avx512"]
INPUT_NAMES = {32: ["mask", "values", "v_mask", "v_values"],
               8: ["mask", "values", "scales", "v_mask", "v_values", "v_scales"]}
INPUT_NAMES[4] = INPUT_NAMES[8]


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    available, reason = kernels.availability()
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the kernel library: {reason}")
        pytest.skip(reason)


def model_bytes(packed: SparseRows, inputs: list[np.ndarray] | None = None, x_shape=(None, None),
                graph_inputs: tuple[str, ...] = (), **attributes) -> bytes:
    """One ai.sslc node; `inputs` replaces the packed arrays, `graph_inputs` makes some non-constant."""
    names = INPUT_NAMES[packed.bits]
    arrays = packed.inputs() if inputs is None else inputs
    node = helper.make_node(packed.op_type, ["x", *names], ["y"], domain=DOMAIN, name="layer0.q_proj",
                            **{**packed.attributes(), **attributes})
    value_infos = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    initializers = []
    for name, array in zip(names, arrays):
        if name in graph_inputs:
            value_infos.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                             list(array.shape)))
        else:
            initializers.append(numpy_helper.from_array(array, name))
    graph = helper.make_graph([node], "sparse", value_infos,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    return onnx_model.SerializeToString()


def session(model: bytes, isa: str | None = None) -> ort.InferenceSession:
    """A session with the library; SSLC_KERNEL_ISA is read when the session creates its kernels."""
    previous = os.environ.get("SSLC_KERNEL_ISA")
    try:
        if isa is not None:
            os.environ["SSLC_KERNEL_ISA"] = isa
        return ort.InferenceSession(model, kernels.session_options(threads=2), providers=["CPUExecutionProvider"])
    finally:
        os.environ.pop("SSLC_KERNEL_ISA", None)
        if previous is not None:
            os.environ["SSLC_KERNEL_ISA"] = previous


def require_isa(isa: str) -> None:
    os.environ["SSLC_KERNEL_ISA"] = isa
    try:
        kernels.isa()
    except UserError as exc:
        pytest.skip(str(exc))
    finally:
        os.environ.pop("SSLC_KERNEL_ISA", None)


def random_layer(n: int, k: int, r: int, density: float, bits: int, group_size: int = 64, empty_rows=(),
                 seed: int = 0, activation_bits: int = 32) -> SparseRows:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, k)) < density
    mask[list(empty_rows)] = False
    return pack(rng.standard_normal((n, k)).astype(np.float32), mask,
                rng.standard_normal((n, r)).astype(np.float32), rng.standard_normal((r, k)).astype(np.float32) / 4,
                bits, group_size, activation_bits)


def assert_matches_reference(y: np.ndarray, x: np.ndarray, packed: SparseRows) -> None:
    """Element-wise fp32 accumulation bound: |y - ref| <= 1e-5 · (|x'|·|W'|ᵀ), x' = [|x|, |x|·|V|ᵀ]."""
    w = np.abs(dequantize(packed.main, packed.bits, packed.group_size)).astype(np.float64)
    v = np.abs(dequantize(packed.v, packed.bits, packed.group_size)).astype(np.float64)
    ax = np.abs(x.astype(np.float64))
    bound = np.concatenate([ax, ax @ v.T], axis=-1) @ w.T
    ref = reference(x, packed)
    assert y.shape == ref.shape and y.dtype == np.float32
    excess = np.abs(y - ref) - (1e-5 * bound + 1e-30)
    assert (excess <= 0).all(), f"max error {np.abs(y - ref).max():.3g} above the fp32 bound"


def assert_matches_quantized_reference(y: np.ndarray, x: np.ndarray, packed: SparseRows) -> None:
    """activation_bits=8: |y - ref| <= 1e-5 · (|q·x_scale|·|W'|ᵀ) (fp32 sums), plus one step x_scale·|W'|
    per column of the groups that hold t: the kernel's fp32 t may round to a neighbouring q."""
    k, gs = packed.in_features, packed.group_size
    rows = x.reshape(-1, k)
    t = quantized_product(rows, packed.v, packed.bits, gs).astype(np.float32)
    q, x_scale = activation_quantize(np.concatenate([rows, t], axis=1), gs)
    cols = k + packed.rank
    dequantized = (np.abs(q) * x_scale[:, :, None]).reshape(len(rows), -1)[:, :cols].astype(np.float64)
    step = np.repeat(x_scale, gs, axis=1)[:, :cols].astype(np.float64)
    step[:, : k // gs * gs] = 0  # groups of x alone are quantized exactly alike
    w = np.abs(dequantize(packed.main, packed.bits, gs)).astype(np.float64)
    bound = (1e-5 * dequantized + (step if packed.rank else 0)) @ w.T
    ref = reference(x, packed).reshape(len(rows), -1)
    assert y.shape == (*x.shape[:-1], packed.out_features) and y.dtype == np.float32
    excess = np.abs(y.reshape(ref.shape) - ref) - (bound + 1e-30)
    assert (excess <= 0).all(), f"max error {np.abs(y.reshape(ref.shape) - ref).max():.3g} above the bound"


# (N, K, R, density, x shape (K appended), group_size, empty rows)
CASES = [
    (1, 37, 0, 0.45, (1,), 64, ()),
    (19, 37, 3, 0.45, (3,), 64, ()),
    (19, 200, 5, 0.01, (1,), 64, ()),
    (19, 200, 5, 0.0, (3,), 16, ()),
    (33, 200, 0, 0.45, (3,), 64, (0, 5, 32)),
    (19, 576, 0, 1.0, (2, 5), 128, ()),
    (64, 37, 7, 0.45, (130,), 16, (3,)),
    (19, 37, 3, 1.0, (128,), 64, ()),
    (576, 576, 16, 0.45, (1,), 64, ()),
    (100, 576, 16, 0.45, (128,), 64, (7,)),
    (3, 1, 0, 1.0, (2,), 16, ()),
    (5, 9, 1, 0.5, (20,), 16, ()),
    (23, 101, 6, 0.45, (5,), 32, (4,)),
    (40, 576, 9, 0.45, (1,), 32, ()),
    (19, 200, 5, 0.45, (2,), 48, ()),
    (2100, 40, 3, 0.45, (33,), 16, (5, 2099)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[2]}d{c[3]}m{'x'.join(map(str, c[4]))}")
def test_matches_reference(isa: str, bits: int, case) -> None:
    require_isa(isa)
    n, k, r, density, lead, group_size, empty_rows = case
    packed = random_layer(n, k, r, density, bits, group_size, empty_rows)
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = session(model_bytes(packed, x_shape=(*[None] * len(lead), k)), isa).run(None, {"x": x})[0]
    assert y.shape == (*lead, n)
    assert_matches_reference(y, x, packed)


@pytest.mark.parametrize("wide", ["0", "1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[2]}d{c[3]}m{'x'.join(map(str, c[4]))}")
def test_both_avx512_fp32_gemvs_match_reference(wide: str, case, monkeypatch) -> None:
    """AVX-512 has two fp32 decode walks (8 lanes, picked on AMD; 16 lanes, picked on Intel): both are tested here."""
    require_isa("avx512")
    monkeypatch.setenv("SSLC_WIDE_GEMV", wide)
    n, k, r, density, lead, group_size, empty_rows = case
    packed = random_layer(n, k, r, density, 32, group_size, empty_rows)
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = session(model_bytes(packed, x_shape=(*[None] * len(lead), k)), "avx512").run(None, {"x": x})[0]
    assert_matches_reference(y, x, packed)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[2]}d{c[3]}m{'x'.join(map(str, c[4]))}")
def test_activation_bits_8_matches_reference(isa: str, bits: int, case) -> None:
    """Integer activations: decode (integer dot products) and prefill (fake-quantized inputs) alike."""
    require_isa(isa)
    n, k, r, density, lead, group_size, empty_rows = case
    packed = random_layer(n, k, r, density, bits, group_size, empty_rows, activation_bits=8)
    x = np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)
    y = session(model_bytes(packed, x_shape=(*[None] * len(lead), k)), isa).run(None, {"x": x})[0]
    assert_matches_quantized_reference(y, x, packed)


# Past the GEMV's rows: the GEMM paths (groups of 32 and 48 too: the integer GEMM takes 16, 32, 64).
PREFILL_CASES = [case for case in CASES if np.prod(case[4]) > 24] + [(45, 130, 5, 0.45, (40,), 32, (2,)),
                                                                     (30, 200, 4, 0.45, (70,), 48, ())]


@pytest.mark.parametrize("int_gemm", ["0", "1"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"n{c[0]}k{c[1]}r{c[2]}d{c[3]}m{'x'.join(map(str, c[4]))}")
def test_both_avx512_integer_prefills_match_reference(int_gemm: str, bits: int, case, monkeypatch) -> None:
    """activation_bits=8 prefill on AVX-512: the integer GEMM (VNNI, groups of 16, 32, 64) and the fp32 tile over
    fake-quantized inputs (SSLC_INT_GEMM=0; also every other group size) must both meet the reference."""
    require_isa("avx512")
    monkeypatch.setenv("SSLC_INT_GEMM", int_gemm)
    n, k, r, density, lead, group_size, empty_rows = case
    packed = random_layer(n, k, r, density, bits, group_size, empty_rows, activation_bits=8)
    x = np.random.default_rng(2).standard_normal((*lead, k)).astype(np.float32)
    y = session(model_bytes(packed, x_shape=(*[None] * len(lead), k)), "avx512").run(None, {"x": x})[0]
    assert_matches_quantized_reference(y, x, packed)


# q, k, v of one attention (k and v with odd ranks), or gate and up of one MLP; K a multiple of the group.
MERGED = {"qkv": [(40, 64, 5), (16, 64, 3), (16, 64, 0)], "gate_up": [(36, 64, 7), (36, 64, 9)]}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits,activation_bits", [(32, 32), (8, 32), (4, 32), (8, 8), (4, 8)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 65)], ids=["m1", "m3", "m130"])
@pytest.mark.parametrize("kind", list(MERGED))
def test_merged_node_computes_what_its_parts_did(isa: str, bits: int, activation_bits: int, lead, kind: str) -> None:
    """One node for q/k/v (outputs side by side) or gate/up with the swiglu, against the separate
    parts' reference: the merge carries every kept value, integer and scale over unchanged."""
    require_isa(isa)
    parts = [random_layer(n, k, r, 0.45, bits, 32, seed=seed, activation_bits=activation_bits)
             for seed, (n, k, r) in enumerate(MERGED[kind])]
    swiglu = kind == "gate_up"
    merged = merge(parts, interleave=swiglu)
    x = np.random.default_rng(3).standard_normal((*lead, 64)).astype(np.float32)
    y = session(model_bytes(merged, x_shape=(*[None] * len(lead), 64)), isa).run(None, {"x": x})[0]
    outputs = [reference(x, p) for p in parts]
    if swiglu:
        gate, up = outputs
        want = gate / (1 + np.exp(-gate)) * up
        scale = np.abs(gate).max() * np.abs(up).max()
    else:
        want = np.concatenate(outputs, axis=-1)
        scale = np.abs(want).max()
    assert y.shape == want.shape
    # fp32 sums (and, with int8 activations, t rounded to a neighbouring q) as in the per-part tests
    tolerance = 1e-5 if activation_bits == 32 else 2e-2
    assert np.abs(y - want).max() <= tolerance * scale


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_is_accurate_over_a_wide_range(isa: str) -> None:
    """The epilogue's exp: gate values from -100 to 100 (silu saturates both ways), 1e-6 relative."""
    require_isa(isa)
    n = 2000
    mask = np.zeros((2 * n, 16), bool)
    mask[:, 0] = True
    values = np.zeros((2 * n, 16), np.float32)
    values[0::2, 0] = np.linspace(-100, 100, n, dtype=np.float32)  # gate row j = g_j · x0
    values[1::2, 0] = 1.0  # up row j = x0
    packed = pack(values, mask, np.zeros((2 * n, 0), np.float32), np.zeros((0, 16), np.float32))
    packed = SparseRows(packed.main, packed.v, 32, 64, activation="swiglu")
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 1.0
    y = session(model_bytes(packed, x_shape=(None, 16)), isa).run(None, {"x": x})[0]
    gate = values[0::2, 0].astype(np.float64)
    want = gate / (1 + np.exp(-gate))
    assert np.abs(y[0] - want).max() <= 1e-6 * np.maximum(np.abs(want), 1e-3).max()
    assert (np.abs(y[0] - want) <= 2e-6 * np.abs(want) + 1e-30).all()


def test_default_isa_is_the_best_this_cpu_has() -> None:
    assert kernels.isa() in ("avx2", "avx512")
    os.environ["SSLC_KERNEL_ISA"] = "sse9"
    try:
        with pytest.raises(UserError, match="SSLC_KERNEL_ISA must be scalar, avx2 or avx512"):
            kernels.isa()
        with pytest.raises(Exception, match="SSLC_KERNEL_ISA must be"):
            ort.InferenceSession(model_bytes(random_layer(4, 16, 0, 0.5, 32)), kernels.session_options())
    finally:
        os.environ.pop("SSLC_KERNEL_ISA", None)


def corrupt(packed: SparseRows, index: int, array: np.ndarray) -> list[np.ndarray]:
    inputs = packed.inputs()
    inputs[index] = array
    return inputs


def malformed_cases():
    """(id, model bytes, expected message) for weights a model file could carry."""
    f32 = random_layer(19, 37, 3, 0.45, 32)
    i8 = random_layer(19, 37, 3, 0.45, 8, group_size=16)
    i4 = random_layer(19, 37, 3, 0.45, 4, group_size=16)
    narrow = random_layer(19, 37, 0, 0.45, 32)
    stray = narrow.main.mask.copy()
    stray[4, -1] |= 0x80  # column 39 >= K + R = 37
    yield "value count", model_bytes(f32, corrupt(f32, 1, f32.main.values[:-1])), "values must be 1-D float32 with"
    yield "int4 bytes", model_bytes(i4, corrupt(i4, 1, np.append(i4.main.values, np.uint8(0)))), "byte-aligned"
    yield "mask shape", model_bytes(f32, corrupt(f32, 0, np.zeros((19, 6), np.uint8))), "mask must have shape \\[19, 5\\]"
    yield "stray bits", model_bytes(narrow, corrupt(narrow, 0, stray)), "mask row 4 keeps columns past its width 37"
    yield "scales shape", model_bytes(i8, corrupt(i8, 2, i8.main.scales[:, :-1])), "scales must have shape \\[19, 3\\]"
    yield "V scales", model_bytes(i8, corrupt(i8, 5, i8.v.scales[:, :2])), "V: scales must have shape \\[3, 3\\]"
    yield "V wrong K", model_bytes(f32, in_features=29), "V: mask must have shape \\[3, 4\\], got \\[3, 5\\]"
    yield "group size", model_bytes(i4, group_size=24), "group_size must be a positive multiple of 16"
    yield "activation bits", model_bytes(i8, activation_bits=16), "activation_bits must be 8 or 32, got 16"
    yield "fp32 activation bits", model_bytes(f32, activation_bits=8), "activation_bits must be 32, got 8"
    yield "not constant", model_bytes(f32, graph_inputs=("values",)), "input 2 \\(values\\) must be a constant initializer"
    yield "activation", model_bytes(f32, activation="gelu"), 'activation must be absent or "swiglu", got "gelu"'
    yield "odd swiglu rows", model_bytes(f32, activation="swiglu"), "activation swiglu needs \\(gate, up\\) row pairs, but W' has 19 rows"


@pytest.mark.parametrize("case", list(malformed_cases()), ids=lambda c: c[0])
def test_malformed_weights_are_refused_at_session_creation(case) -> None:
    _, model, message = case
    with pytest.raises(Exception, match=message) as info:
        session(model)
    assert "node 'layer0.q_proj'" in str(info.value)


def test_x_with_the_wrong_width_is_an_error_not_a_crash() -> None:
    packed = random_layer(19, 37, 3, 0.45, 8)
    with pytest.raises(Exception, match=r"x must be float32 \[\.\.\., 37\], got last dimension 36"):
        session(model_bytes(packed)).run(None, {"x": np.zeros((2, 36), np.float32)})


@pytest.mark.parametrize("x_shape", [(None, 37), ("batch", 37), (2, 37)], ids=["anonymous", "symbolic", "fixed"])
def test_inferred_output_shape_agrees_with_the_run(x_shape, capfd) -> None:
    """The op's shape inference must not declare sizes the run contradicts (onnxruntime warns on every run)."""
    model = model_bytes(random_layer(19, 37, 3, 0.45, 32), x_shape=x_shape)
    y = session(model).run(None, {"x": np.ones((2, 37), np.float32)})[0]
    assert y.shape == (2, 19)
    assert "VerifyOutputSizes" not in capfd.readouterr().err


def test_missing_library_names_the_fix(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SSLC_KERNELS_LIBRARY", str(tmp_path / "nothing.so"))
    available, reason = kernels.availability()
    assert not available and "make kernels" in reason
    with pytest.raises(UserError, match="make kernels"):
        kernels.session_options()


def test_under_address_sanitizer(tmp_path: Path) -> None:
    """The kernel tests once more against an ASan build (a representative subset, malformed inputs included)."""
    if os.environ.get("SSLC_UNDER_ASAN"):
        pytest.skip("already running under AddressSanitizer")
    build = kernels.ROOT / "build" / "kernels-asan"
    built = subprocess.run([str(kernels.ROOT / "runtimes" / "kernels" / "build.sh"), str(build), "-DSSLC_ASAN=ON"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    # libstdc++ is preloaded too: ASan resolves its __cxa_throw interceptor at start-up, and
    # python itself does not link libstdc++ (without it the first C++ exception aborts).
    preload = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
               for name in ("libasan.so", "libstdc++.so")]
    env = {**os.environ, "LD_PRELOAD": " ".join(preload), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "SSLC_KERNELS_LIBRARY": str(build / "libsslc_kernels.so"), "SSLC_UNDER_ASAN": "1"}
    subset = ("malformed or wrong_width or merged_node or swiglu or integer_prefills or "
              "(matches_reference and not n576k576 and not n100k576)")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", subset],
                            capture_output=True, text=True, env=env, cwd=kernels.ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_kernel_bench_reports_every_op(tmp_path: Path, monkeypatch) -> None:
    from sslc_export.runtimes import kernelbench

    monkeypatch.setattr(kernelbench, "MAX_COPIES", 2)
    monkeypatch.setattr(kernelbench, "EVICT_BYTES", 1 << 20)
    report = tmp_path / "results.md"
    result = kernelbench.run_kernel_bench(threads=1, seconds=0.01, shapes=((40, 48),), rows=(1, 3), report=report,
                                          json_path=tmp_path / "kernels.json", progress=lambda _: None)
    assert {row["op"] for row in result["rows"]} == {"MatMul fp32", "MatMulNBits int4", "SparseMatMul fp32",
                                                     "SparseMatMulInt8", "SparseMatMulInt4", "SparseMatMulInt8 a8",
                                                     "SparseMatMulInt4 a8"}
    assert len(result["rows"]) == 14 and result["copy_gb_per_s"] > 0
    assert "<!-- BEGIN kernels -->" in report.read_text() and (tmp_path / "kernels.json").exists()
