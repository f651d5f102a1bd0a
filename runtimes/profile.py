"""Where a decode step's time goes: onnxruntime's own per-node trace of a few decode steps,
summed per operator type. About half of a decode step of optimum's unfused graph is per-node
overhead, so the node counts matter as much as the kernels."""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from sslc_export.runtimes.session import OnnxCausalLM


def profile_decode(folder: Path, prompt_ids: np.ndarray, steps: int = 8, threads: int | None = None) -> dict:
    """Prefill `prompt_ids` without profiling, then profile `steps` greedy decode steps.

    Returns per operator type: node count per step, total ms per step, and share of the step."""
    plain = OnnxCausalLM(folder, threads=threads)
    logits, past = plain.step(prompt_ids, plain.empty_past())
    with tempfile.TemporaryDirectory() as work:
        traced = OnnxCausalLM(folder, threads=threads, profile_prefix=Path(work) / "decode")
        next_id = np.array([[int(logits[0, -1].argmax())]])
        traced.step(next_id, past)  # warm-up: first-run allocations are not a decode step's cost
        traced.session.end_profiling()
        traced = OnnxCausalLM(folder, threads=threads, profile_prefix=Path(work) / "decode")
        for _ in range(steps):
            logits, past = traced.step(next_id, past)
            next_id = np.array([[int(logits[0, -1].argmax())]])
        events = json.loads(Path(traced.session.end_profiling()).read_text())
    per_op: dict[str, dict] = defaultdict(lambda: {"nodes": set(), "us": 0.0})
    step_us = 0.0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            step_us += event["dur"]
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        per_op[op]["nodes"].add(event["name"])
        per_op[op]["us"] += event["dur"]
    step_ms = step_us / steps / 1e3
    rows = sorted(((op, len(v["nodes"]), v["us"] / steps / 1e3) for op, v in per_op.items()), key=lambda r: -r[2])
    kernel_ms = sum(ms for _, _, ms in rows)
    return {
        "model": Path(folder).name, "steps": steps, "step_ms": step_ms, "kernel_ms": kernel_ms,
        "overhead_ms": step_ms - kernel_ms,  # time in the run outside every node's kernel: scheduling, allocation, copies
        "ops": [{"op": op, "nodes": nodes, "ms": ms, "share": ms / step_ms if step_ms else 0.0} for op, nodes, ms in rows],
    }
