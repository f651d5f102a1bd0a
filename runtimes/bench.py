"""The benchmark protocol (DESIGN.md): per model folder and provider, prompt processing at
32/128/512 tokens and decode over >= 64 new tokens at batch 1, warm-up first, p50 and p90,
peak RSS, file size, and perplexity on each held-out text through the same onnxruntime session
(three bundled texts, about 1.8x the tokens Alice alone took; `--heldout prose` for that alone).

Each (model, provider) pair runs in its own child process so that its peak RSS is its own.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import AutoConfig, AutoTokenizer

from sslc_export.models.loading import fix_end_token
from sslc_export.runtimes.providers import get_provider
from sslc_export.runtimes.session import EXPORT_MANIFEST, ONNX_FILE, OnnxCausalLM
from sslc_export import defaults
from sslc_export.errors import UserError
from sslc_export.evaluate import perplexity_per_text
from sslc_export.memory import peak_rss_bytes


@dataclass(frozen=True)
class BenchConfig:
    prompt_lengths: tuple[int, ...] = defaults.BENCH_PROMPT_LENGTHS
    decode_tokens: int = defaults.BENCH_DECODE_TOKENS
    decode_prompt: int = 128
    repeats: int = defaults.BENCH_REPEATS
    warmup: int = 2
    threads: int | None = None
    texts: dict[str, str] = field(default_factory=dict)  # name -> held-out text: timing ids from the first, perplexity on each
    measure_perplexity: bool = True
    window: int = defaults.WINDOW
    genai: bool = False  # also decode through onnxruntime-genai and compare its greedy tokens with ours
    rounds: int = 1  # passes over all folders; timings pooled, so a slow spell of the machine falls on every model


def cpu_flags() -> list[str]:
    """The SIMD extensions our kernels dispatch on, as the CPU reports them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [flag for flag in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni") if flag in flags]


def machine() -> dict:
    from sslc_export.runtimes import kernels

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": __import__("onnxruntime").__version__, "cpu_flags": cpu_flags(),
            "kernel_isa": kernels.isa() if kernels.availability()[0] else None}


def _percentiles(samples: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(samples, 50) * 1e3), "p90_ms": float(np.percentile(samples, 90) * 1e3)}


def _timed(run, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def lm_head_in_graph(model_path: Path) -> str:
    """The precision of the node that writes `logits` (for folders without our export.json): fp32 for a MatMul,
    int<bits> for MatMulNBits, else its operator's name."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    node = next((node for node in graph.node if "logits" in node.output), None)
    if node is None:
        return "?"
    if node.op_type == "MatMulNBits":
        bits = next((attr.i for attr in node.attribute if attr.name == "bits"), 4)
        return f"int{bits}"
    return "fp32" if node.op_type in ("MatMul", "Gemm") else node.op_type


def bench_model(folder: Path, provider: str, config: BenchConfig, timing_only: bool = False) -> dict:
    """One folder's measurements; "samples" keeps the raw step times (seconds) so rounds can be pooled.
    `timing_only`: no perplexity (a later round of the same folder)."""
    runtime = OnnxCausalLM(folder, provider, config.threads)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_end_token(tokenizer, AutoConfig.from_pretrained(folder))
    ids = tokenizer(next(iter(config.texts.values())), return_tensors="np", add_special_tokens=False).input_ids
    longest = max(*config.prompt_lengths, config.decode_prompt)
    if ids.shape[1] < longest:
        raise UserError(f"the benchmark text has {ids.shape[1]} tokens; it needs at least {longest}")
    record = json.loads((folder / EXPORT_MANIFEST).read_text()) if (folder / EXPORT_MANIFEST).is_file() else {}
    # A folder written by another tool (onnxruntime-genai's model builder) has no export.json.
    result: dict = {"model": folder.name, "provider": provider, "format": record.get("format", "other tool"),
                    "lm_head": record.get("lm_head") or lm_head_in_graph(folder / ONNX_FILE),
                    "samples": {"prefill": {}}}
    for length in config.prompt_lengths:
        prompt = ids[:, :length]
        result["samples"]["prefill"][str(length)] = _timed(lambda: runtime.step(prompt, runtime.empty_past()),
                                                           config.repeats, config.warmup)

    greedy: list[int] = []

    def decode_once() -> list[float]:
        logits, past = runtime.step(ids[:, : config.decode_prompt], runtime.empty_past())
        greedy.clear()
        steps = []
        for _ in range(config.decode_tokens):
            greedy.append(int(logits[0, -1].argmax()))
            start = time.perf_counter()
            logits, past = runtime.step(np.array([greedy[-1:]], dtype=np.int64), past)
            steps.append(time.perf_counter() - start)
        return steps

    for _ in range(config.warmup):
        decode_once()
    result["samples"]["decode"] = [t for _ in range(max(1, config.repeats // 2)) for t in decode_once()]
    if config.genai:
        result["genai"], result["samples"]["genai"] = _genai_decode(folder, ids[0, : config.decode_prompt].tolist(), greedy, config)
    if config.measure_perplexity and not timing_only:

        def onnx_logits(chunk: torch.Tensor) -> torch.Tensor:
            logits, _ = runtime.step(chunk.numpy(), runtime.empty_past())
            return torch.from_numpy(logits[0])

        # A window past the model's context is not a perplexity the model defines (a fused graph's rotary cache ends there).
        window = min(config.window, AutoConfig.from_pretrained(folder).max_position_embeddings)
        result["perplexity"] = {name: value["perplexity"] for name, value in perplexity_per_text(onnx_logits, tokenizer, config.texts, window).items()}
    result["file_bytes"] = sum(p.stat().st_size for p in folder.glob(f"{ONNX_FILE}*"))
    return result


def summarize(result: dict) -> dict:
    """Percentiles (and throughput) from a result's raw samples, which it then drops."""
    samples = result.pop("samples")
    result["prefill"] = {}
    for length, times in samples["prefill"].items():
        stats = _percentiles(times)
        result["prefill"][length] = {**stats, "tokens_per_s": int(length) / (stats["p50_ms"] / 1e3)}
    result["decode"] = _percentiles(samples["decode"])
    result["decode"]["tokens_per_s"] = 1e3 / result["decode"]["p50_ms"]
    if "genai" in samples:
        stats = _percentiles(samples["genai"])
        result["genai"]["decode"] = {**stats, "tokens_per_s": 1e3 / stats["p50_ms"]}
    return result


def pool(first: dict, later: dict) -> None:
    """Adds a later round's samples (and peak memory) of the same folder to `first`."""
    for length, times in later["samples"]["prefill"].items():
        first["samples"]["prefill"][length] += times
    first["samples"]["decode"] += later["samples"]["decode"]
    if "genai" in later["samples"]:
        first["samples"]["genai"] += later["samples"]["genai"]
    first["peak_rss_bytes"] = max(first["peak_rss_bytes"], later["peak_rss_bytes"])


def _genai_decode(folder: Path, prompt: list[int], ours: list[int], config: BenchConfig) -> tuple[dict, list[float]]:
    """The same decode through onnxruntime-genai: whether it picks our greedy tokens, and its step times."""
    from sslc_export.runtimes.genai import GenaiCausalLM

    engine = GenaiCausalLM(folder, config.threads)
    for _ in range(config.warmup):
        engine.greedy(prompt, config.decode_tokens)
    tokens, seconds = [], []
    for _ in range(max(1, config.repeats // 2)):
        tokens, run = engine.greedy(prompt, config.decode_tokens)
        seconds += run[1:]  # the first call only picks the token the prefill already scored
    same = sum(a == b for a, b in zip(tokens, ours))
    return {"greedy_agreement": same / max(len(ours), 1)}, seconds


def _child(folder: str, provider: str, config: BenchConfig, timing_only: bool, queue) -> None:
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    try:
        result = bench_model(Path(folder), provider, config, timing_only)
        result["peak_rss_bytes"] = peak_rss_bytes()
        result["device_memory_bytes"] = get_provider(provider).device_memory_bytes()
        queue.put(("ok", result))
    except UserError as exc:
        queue.put(("error", str(exc)))
    except Exception as exc:  # report, rather than hang the parent waiting for a result
        queue.put(("error", f"benchmark of {folder} on {provider} failed: {type(exc).__name__}: {exc}"))


def _wait(process, queue, folder: Path) -> tuple[str, object]:
    import queue as queue_module

    while True:
        try:
            return queue.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():
                return "error", f"the benchmark process for {folder} died (exit code {process.exitcode})"


def bench(folders: list[Path], providers: list[str], config: BenchConfig) -> dict:
    """One run over every folder and provider; ratios are taken against the first folder. Each folder is measured
    in its own process; with config.rounds > 1 every folder is measured again in each later round (timings only)
    and its timings are pooled over the rounds.

    A folder that fails after the baseline is recorded under "failures" and the others are still measured: a
    half-hour run is not lost to one broken export. The baseline failing ends the run (nothing to compare to)."""
    for folder in folders:
        if not (folder / ONNX_FILE).is_file():
            raise UserError(f"{folder} has no {ONNX_FILE}: pass folders written by `sslc-export export`")
    context = multiprocessing.get_context("spawn")
    results: dict[tuple[str, int], dict] = {}
    failures = []
    for round_index in range(config.rounds):
        for provider in providers:
            for index, folder in enumerate(folders):
                key = (provider, index)
                if round_index and key not in results:
                    continue  # failed in an earlier round
                queue = context.Queue()
                process = context.Process(target=_child, args=(str(folder), provider, config, round_index > 0, queue))
                process.start()
                status, payload = _wait(process, queue, folder)
                process.join()
                if status == "error" and index == 0:
                    raise UserError(payload)
                if status == "error":
                    results.pop(key, None)
                    failures.append({"model": folder.name, "provider": provider, "error": payload})
                elif round_index:
                    pool(results[key], payload)
                else:
                    results[key] = payload
    rows = [summarize(results[(provider, index)]) for provider in providers for index in range(len(folders))
            if (provider, index) in results]
    settings = {key: value for key, value in asdict(config).items() if key != "texts"}
    return {"machine": machine(), "threads": config.threads or os.cpu_count(), "config": settings, "rows": rows,
            "failures": failures}


LEADING_COLUMNS = ["model", "provider", "format", "lm_head", "size MB"]  # then one prefill column per prompt length measured
DECODE_COLUMNS = ["decode ms/tok p50", "decode p90", "decode tok/s", "decode speed-up", "peak RSS MB"]
GPU_COLUMNS = ["GPU memory MB"]
GENAI_COLUMNS = ["genai decode ms/tok p50", "genai greedy = ours"]


def _on_gpu(report: dict) -> bool:
    return any(row.get("device_memory_bytes") for row in report["rows"])


def _heldout_names(report: dict) -> list[str]:
    return list(next((row["perplexity"] for row in report["rows"] if "perplexity" in row), {}))


def _prefill_lengths(report: dict) -> list[str]:
    """Every prompt length some row was timed at, shortest first."""
    return sorted({length for row in report["rows"] for length in row["prefill"]}, key=int)


def columns(report: dict) -> list[str]:
    perplexity_columns = [f"ppl {name}" for name in _heldout_names(report)]
    prefill_columns = [f"prefill {length} tok/s" for length in _prefill_lengths(report)]
    genai = any("genai" in row for row in report["rows"])
    return (LEADING_COLUMNS + prefill_columns + DECODE_COLUMNS + perplexity_columns + GPU_COLUMNS * _on_gpu(report)
            + GENAI_COLUMNS * genai)


def table_rows(report: dict) -> list[list[str]]:
    rows = report["rows"]
    base = {row["provider"]: row for row in rows if row["model"] == rows[0]["model"]}
    on_gpu = _on_gpu(report)
    names = _heldout_names(report)
    lengths = _prefill_lengths(report)
    out = []
    for row in rows:
        ref = base[row["provider"]]
        cells = [
            row["model"], row["provider"], row.get("format", "?"), row.get("lm_head", "fp32"), f"{row['file_bytes'] / 1e6:.0f}",
            *(f"{row['prefill'][length]['tokens_per_s']:.0f}" if length in row["prefill"] else "" for length in lengths),
            f"{row['decode']['p50_ms']:.1f}", f"{row['decode']['p90_ms']:.1f}", f"{row['decode']['tokens_per_s']:.1f}",
            f"{ref['decode']['p50_ms'] / row['decode']['p50_ms']:.2f}x",
            f"{row['peak_rss_bytes'] / 1e6:.0f}",
        ]
        cells += [f"{row['perplexity'][name]:.2f}" if "perplexity" in row else "" for name in names]
        if on_gpu:
            cells.append(f"{(row.get('device_memory_bytes') or 0) / 1e6:.0f}")
        if "genai" in row:
            cells += [f"{row['genai']['decode']['p50_ms']:.1f}", f"{row['genai']['greedy_agreement']:.0%}"]
        out.append(cells)
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), sorted by the first."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def plot(report: dict, path: Path) -> None:
    """Two trade-offs users pick from, each with its Pareto front: decode time vs worst held-out perplexity, and
    file size vs worst held-out perplexity (log axes). Points are numbered and named in a legend, so labels
    never overlap; a point off a front is dominated by one on it. Without perplexity: decode time vs size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    rows = report["rows"]
    names = [f"{r['model']} ({r['provider']})" if len({x['provider'] for x in rows}) > 1 else r["model"] for r in rows]
    decode = [r["decode"]["p50_ms"] for r in rows]
    size = [r["file_bytes"] / 1e6 for r in rows]
    with_perplexity = all("perplexity" in r for r in rows)
    quality = [max(r["perplexity"].values()) for r in rows] if with_perplexity else None
    panels = ([(decode, "decode ms/token (p50, lower is better)"), (size, "file size MB")] if with_perplexity
              else [(size, "file size MB")])
    y_values, y_label = (quality, "worst held-out perplexity") if with_perplexity else (decode, "decode ms/token (p50)")
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 2.5, 4.6), squeeze=False)
    for ax, (x_values, x_label) in zip(axes[0], panels):
        front = pareto_front(list(zip(x_values, y_values)))
        ax.plot([x_values[i] for i in front], [y_values[i] for i in front], "-", color="#999999", zorder=1, drawstyle="steps-post")
        for i, (x, y) in enumerate(zip(x_values, y_values)):
            on_front = i in front
            ax.scatter(x, y, s=120, zorder=2, color=f"C{i % 10}" if on_front else "white", edgecolors=f"C{i % 10}", linewidths=1.5)
            ax.annotate(str(i + 1), (x, y), ha="center", va="center", fontsize=7, zorder=3,
                        color="white" if on_front else f"C{i % 10}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 2x10^1
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("filled: on the Pareto front (nothing beats it on both axes)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=f"C{i % 10}", label=f"{i + 1}  {name}")
               for i, name in enumerate(names)]
    figure.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    figure.suptitle(f"{report['machine']['cpu']}, {report['threads']} threads")
    figure.tight_layout(rect=(0, 0, 1 - 2.3 / (6 * len(panels) + 2.5), 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
