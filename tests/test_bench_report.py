"""The bench picture: Pareto fronts computed right, and the figure drawn with and without perplexity."""
from pathlib import Path

import pytest

from sslc_export.runtimes.bench import pareto_front, plot


@pytest.mark.parametrize("points,front", [
    ([(1, 5), (2, 3), (3, 4), (4, 1)], [0, 1, 3]),  # (3, 4) is beaten by (2, 3) on both axes
    ([(2, 2), (1, 3), (2, 2)], [1, 0]),             # ties: one of two equal points is enough
    ([(5, 5)], [0]),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def report(perplexity: bool) -> dict:
    rows = []
    for i, (ms, mb, ppl) in enumerate([(23.0, 540, 18.5), (10.6, 182, 22.2), (21.8, 342, 27.1)]):
        row = {"model": f"m{i}", "provider": "cpu", "decode": {"p50_ms": ms, "tokens_per_s": 1e3 / ms}, "file_bytes": mb * 1e6}
        if perplexity:
            row["perplexity"] = {"prose": ppl, "code": ppl * 1.5}
        rows.append(row)
    return {"machine": {"cpu": "test"}, "threads": 2, "rows": rows}


@pytest.mark.parametrize("perplexity", [True, False])
def test_plot_writes_a_picture(tmp_path: Path, perplexity: bool):
    plot(report(perplexity), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.parametrize("op, attributes, expected", [
    ("MatMul", {}, "fp32"), ("MatMulNBits", {"bits": 4, "K": 8, "N": 8, "block_size": 16}, "int4"),
    ("MatMulNBits", {"bits": 8, "K": 8, "N": 8, "block_size": 16}, "int8"), ("Relu", {}, "Relu")])
def test_lm_head_read_from_a_foreign_graph(tmp_path: Path, op, attributes, expected):
    """A folder without our export.json (onnxruntime-genai's builder) still gets its lm_head column."""
    import onnx
    from onnx import TensorProto, helper

    from sslc_export.runtimes.bench import lm_head_in_graph

    node = helper.make_node(op, ["hidden", "w"][: 1 if op == "Relu" else 2], ["logits"], **attributes)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    assert lm_head_in_graph(tmp_path / "model.onnx") == expected


def test_measured_by_line_keeps_empty_option_values(monkeypatch) -> None:
    """The reports quote the command as typed: an empty value (`--extra-losses ""`) must stay visible."""
    import sys

    from sslc_export import cli

    monkeypatch.setattr(sys, "argv", ["sslc-export", "compare", "--extra-losses", "", "--ratios", "0.5"])
    assert cli._invocation("compare") == "sslc-export compare --extra-losses '' --ratios 0.5"


def test_only_measured_prompt_lengths_get_a_prefill_column():
    """A column per prompt length some row was timed at (none of empty 512 figures after --prompt-lengths 128), in
    order; a row without a length gets an empty cell."""
    from sslc_export.runtimes.bench import columns, table_rows

    rows = [{"model": f"m{i}", "provider": "cpu", "file_bytes": 1e6, "peak_rss_bytes": 1e6, "prefill": prefill,
             "decode": {"p50_ms": 10.0, "p90_ms": 11.0, "tokens_per_s": 100.0}}
            for i, prefill in enumerate([{"128": {"tokens_per_s": 500.0}}, {"32": {"tokens_per_s": 900.0}}])]
    report = {"rows": rows}
    headers = columns(report)
    assert [header for header in headers if header.startswith("prefill")] == ["prefill 32 tok/s", "prefill 128 tok/s"]
    cells = table_rows(report)
    assert all(len(row) == len(headers) for row in cells)
    position = headers.index("prefill 32 tok/s")
    assert [row[position:position + 2] for row in cells] == [["", "500"], ["900", ""]]
