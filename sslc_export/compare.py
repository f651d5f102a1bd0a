"""Side-by-side quality of methods at equal budgets: compress each variant (at each --bits), optionally
fine-tune it, measure perplexity on every held-out text, return rows for a table. Finished checkpoints
(compressed and fine-tuned) and their perplexities are reused, so an interrupted sweep picks up where it stopped."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sslc_export.models.architectures import check_targets
from sslc_export.models.loading import load_model
from sslc_export.budget import check_ratio
from sslc_export.atomic import sha256_file, write_json_atomic
from sslc_export.calibration import CalibrationSet
from sslc_export.checkpoint import MANIFEST, load_checkpoint
from sslc_export.compress import CompressJob, compress, fingerprint
from sslc_export.errors import UserError
from sslc_export.evaluate import perplexity_per_text
from sslc_export.finetune import FinetuneJob, finetune, finished
from sslc_export.methods import get_method
from sslc_export.patterns import Pattern
from sslc_export.quantization import BITS

RTN_METHOD = "magnitude"  # at --ratio 0 with --bits: every weight kept, rounded to nearest per group
PERPLEXITIES = "perplexities.json"  # in the work dir: what PerplexityCache has measured


@dataclass(frozen=True)
class Variant:
    method: str
    ratio: float
    loss: str | None = None  # None: the method's default
    allocation: str = "uniform"  # how the budget is split over layers (compress --allocation)
    bits: int = 32  # compress --bits (at its default --group-size)

    @property
    def label(self) -> str:
        """The checkpoint's folder name; uniform and fp32 add nothing, so earlier sweeps keep their labels and checkpoints."""
        suffix = "" if self.allocation == "uniform" else f"-{self.allocation}"
        bits = "" if self.bits == 32 else f"-b{self.bits}"
        return f"{self.method}-{self.loss or 'default'}-r{self.ratio}{suffix}{bits}"

    @property
    def name(self) -> str:
        """The table's method cell: what a ratio-0 quantized variant is (a quantized dense model) and its allocation."""
        name = self.method
        if self.ratio == 0:
            name = f"RTN int{self.bits}" if self.method == RTN_METHOD else f"{self.method} int{self.bits} dense (GPTQ)"
        return name + ("" if self.allocation == "uniform" else f" ({self.allocation})")


def parse_bits(text: str) -> list[int]:
    """Comma-separated bit widths of compress --bits, each once, in the order given."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or any(item not in map(str, BITS) for item in items):
        raise UserError(f"--bits must be comma-separated values of {', '.join(map(str, BITS))}, got '{text}'")
    return list(dict.fromkeys(int(item) for item in items))


def parse_variants(methods: str, ratios: str, losses: str, allocations: str = "uniform", bits: str = "32",
                   rtn: bool = False) -> list[Variant]:
    """methods × ratios at each method's default loss; `losses` (method:loss,...) adds variants; each variant once per
    allocation in `allocations` and per bit width in `bits` (comma-separated). Ratio 0 at 32 bits is the dense row
    itself, so with a quantized width it runs only at those. `rtn` adds round-to-nearest of the dense model per
    quantized width, first."""
    try:
        ratio_values = [float(value) for value in ratios.split(",") if value]
    except ValueError:
        raise UserError(f"--ratios must be comma-separated numbers, got '{ratios}'") from None
    extra = [item.split(":") for item in losses.split(",") if item]
    if any(len(pair) != 2 for pair in extra):
        raise UserError(f"--extra-losses must look like sslc:exact,svd:exact, got '{losses}'")
    widths = parse_bits(bits)
    quantized = [width for width in widths if width != 32]
    variants = [Variant(RTN_METHOD, 0.0, None, "uniform", width) for width in quantized] if rtn else []
    if rtn and not quantized:
        raise UserError("--rtn quantizes the dense model: give a --bits below 32 (e.g. --bits 32,4)")
    for ratio in ratio_values:
        for width in quantized if ratio == 0 and quantized else widths:
            for method in (m for m in methods.split(",") if m):
                for allocation in (a for a in allocations.split(",") if a):
                    variants.append(Variant(method, ratio, None, allocation, width))
                    variants += [Variant(method, ratio, loss, allocation, width) for name, loss in extra if name == method]
    return list(dict.fromkeys(variants))  # --rtn and --methods magnitude --ratios 0 name the same checkpoint


def variant_job(variant: Variant, base_job: CompressJob, work_dir: Path) -> CompressJob:
    """The compress job of one variant, its settings resolved and checked (a one-line error before any work)."""
    method = get_method(variant.method)
    job = replace(base_job, out=work_dir / variant.label, method=variant.method, ratio=variant.ratio, overwrite=True,
                  allocation=replace(base_job.allocation, mode=variant.allocation))
    if job.pattern.kind not in method.patterns:  # e.g. losparse, structured only: its own pattern, as compress's default
        job = replace(job, pattern=Pattern(kind=method.patterns[0]))
    rtn = variant.method == RTN_METHOD and variant.ratio == 0  # onnxruntime's quantizer: scales from max |w|
    settings = method.resolve(replace(base_job.settings, loss=variant.loss, bits=variant.bits,
                                      scales="max" if rtn else base_job.settings.scales), job.pattern)
    job = replace(job, settings=settings)
    check_ratio(job.ratio, quantized=settings.grid is not None)
    job.allocation.check(job.ratio, job.streaming)
    check_targets(job.targets)
    method.check(job.pattern, settings)
    return job


def _reusable(folder: Path, job: CompressJob, identity: dict) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    expected = fingerprint(job, identity, CalibrationSet.read(job.calib))  # settings resolved
    return json.loads(path.read_text()).get("fingerprint") == expected


class PerplexityCache:
    """Perplexities already measured in a work dir (perplexities.json), each keyed by what decides it: the checkpoint's
    manifest hash (which hashes every file) or the dense model's content hash, the texts and the window. An
    interrupted compare then resumes without evaluating a finished checkpoint again."""

    def __init__(self, work_dir: Path, texts: dict[str, str], window: int):
        self.path = work_dir / PERPLEXITIES
        contents = json.dumps({"window": window, "texts": texts}, sort_keys=True).encode()
        self.setting = hashlib.sha256(contents).hexdigest()[:16]
        try:
            self.entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.entries = {}  # a damaged cache costs only the evaluations again

    def get(self, identity: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        key = f"{identity}/{self.setting}"
        if key not in self.entries:
            self.entries[key] = measure()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
        return self.entries[key]


def compare(
    variants: list[Variant],
    base_job: CompressJob,
    work_dir: Path,
    texts: dict[str, str],
    window: int,
    progress: Callable[[str], None] | None = None,
    tune: FinetuneJob | None = None,
) -> list[dict]:
    """Rows of figures: the dense model first, then each variant, and after each one with low-rank factors its
    fine-tuned child when `tune` (a FinetuneJob whose checkpoint and out are filled per variant) is given; perplexity
    is a name -> value map, one per text."""
    dense = load_model(base_job.model)
    identity = dense.identity  # the content hash checkpoints are tied to
    cache = PerplexityCache(work_dir, texts, window)
    dense_ppl = cache.get(identity["sha256"], lambda: _perplexities(dense.model, dense.tokenizer, texts, window))
    dense_bytes = sum(parameter.numel() * parameter.element_size() for parameter in dense.model.parameters())
    rows = [{"variant": "dense", "name": "dense", "method": "dense", "ratio": 0.0, "loss": "", "bits": 32, "perplexity": dense_ppl,
             "bytes": dense_bytes}]
    for variant in variants:
        if progress:
            progress(variant.label)
        job = variant_job(variant, base_job, work_dir)
        if _reusable(job.out, job, identity):
            loaded, manifest = load_checkpoint(job.out)
        else:
            outcome = compress(job)
            loaded, manifest = outcome.loaded, outcome.manifest
        losses = [layer["relative_loss"] for layer in manifest["layers"]]
        row = {
            "variant": variant.label,
            "name": variant.name,
            "method": variant.method,
            "ratio": variant.ratio,
            "loss": job.settings.loss,
            "allocation": variant.allocation,
            "bits": variant.bits,
            "perplexity": cache.get(sha256_file(job.out / MANIFEST), lambda: _perplexities(loaded.model, loaded.tokenizer, texts, window)),
            "params_kept": manifest["params_kept"],
            "params_total": manifest["params_total"],
            "mean_relative_loss": sum(losses) / len(losses),
            "bytes": manifest["bytes"]["total"],
            "compression_seconds": manifest["compression_seconds"],
            "threads": manifest["threads"],
        }
        rows.append(row)
        if tune is None or not any(layer["rank"] for layer in manifest["layers"]):  # pruning or a quantized dense model: no U, V
            continue
        if progress:
            progress(f"{variant.label}-ft")
        ft_job = replace(tune, checkpoint=job.out, out=work_dir / f"{variant.label}-ft", overwrite=True)
        ft_manifest = finished(ft_job) or finetune(ft_job)
        parent = {key: value for key, value in row.items() if key != "mean_relative_loss"}  # a layer loss of the parent, not the child

        def tuned_perplexities() -> dict[str, float]:
            tuned, _ = load_checkpoint(ft_job.out)
            return _perplexities(tuned.model, tuned.tokenizer, texts, window)

        rows.append({**parent, "variant": f"{variant.label}-ft", "name": f"{variant.name} + finetune",
                     "perplexity": cache.get(sha256_file(ft_job.out / MANIFEST), tuned_perplexities), "bytes": ft_manifest["bytes"]["total"],
                     "finetune_seconds": ft_manifest["finetune"]["seconds"], "finetune": ft_manifest["finetune"]["settings"]})
    for row in rows[1:]:
        row["perplexity_vs_dense"] = {name: value / dense_ppl[name] for name, value in row["perplexity"].items()}
    return rows


def _perplexities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: dict[str, str], window: int) -> dict[str, float]:
    return {name: result["perplexity"] for name, result in perplexity_per_text(model, tokenizer, texts, window).items()}
