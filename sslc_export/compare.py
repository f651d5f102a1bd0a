"""Side-by-side quality of methods at equal budgets: compress each variant, measure perplexity on
every held-out text, return rows for a table. Finished checkpoints are reused, so an interrupted
sweep picks up where it stopped."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_model
from sslc_export.calibration import CalibrationSet
from sslc_export.checkpoint import MANIFEST, load_checkpoint
from sslc_export.compress import CompressJob, compress, fingerprint
from sslc_export.errors import UserError
from sslc_export.evaluate import perplexity_per_text
from sslc_export.methods import get_method
from sslc_export.patterns import Pattern


@dataclass(frozen=True)
class Variant:
    method: str
    ratio: float
    loss: str | None = None  # None: the method's default
    allocation: str = "uniform"  # how the budget is split over layers (compress --allocation)

    @property
    def label(self) -> str:
        suffix = "" if self.allocation == "uniform" else f"-{self.allocation}"  # uniform keeps the labels of earlier sweeps
        return f"{self.method}-{self.loss or 'default'}-r{self.ratio}{suffix}"


def parse_variants(methods: str, ratios: str, losses: str, allocations: str = "uniform") -> list[Variant]:
    """methods × ratios at each method's default loss; `losses` (method:loss,...) adds variants; each variant once per
    allocation in `allocations` (comma-separated)."""
    try:
        ratio_values = [float(value) for value in ratios.split(",") if value]
    except ValueError:
        raise UserError(f"--ratios must be comma-separated numbers, got '{ratios}'") from None
    extra = [item.split(":") for item in losses.split(",") if item]
    if any(len(pair) != 2 for pair in extra):
        raise UserError(f"--extra-losses must look like sslc:exact,svd:exact, got '{losses}'")
    variants = []
    for ratio in ratio_values:
        for method in (m for m in methods.split(",") if m):
            for allocation in (a for a in allocations.split(",") if a):
                variants.append(Variant(method, ratio, None, allocation))
                variants += [Variant(method, ratio, loss, allocation) for name, loss in extra if name == method]
    return variants


def _reusable(folder: Path, job: CompressJob, identity: dict) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    expected = fingerprint(job, identity, CalibrationSet.read(job.calib))  # settings resolved
    return json.loads(path.read_text()).get("fingerprint") == expected


def compare(
    variants: list[Variant],
    base_job: CompressJob,
    work_dir: Path,
    texts: dict[str, str],
    window: int,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Rows of figures: the dense model first, then each variant; perplexity is a name -> value map, one per text."""
    dense = load_model(base_job.model)
    identity = dense.identity  # the content hash checkpoints are tied to
    dense_ppl = _perplexities(dense.model, dense.tokenizer, texts, window)
    rows = [{"variant": "dense", "method": "dense", "ratio": 0.0, "loss": "", "perplexity": dense_ppl}]
    for variant in variants:
        if progress:
            progress(variant.label)
        job = replace(
            base_job,
            out=work_dir / variant.label,
            method=variant.method,
            ratio=variant.ratio,
            overwrite=True,
            allocation=replace(base_job.allocation, mode=variant.allocation),
        )
        method = get_method(variant.method)
        if job.pattern.kind not in method.patterns:  # e.g. losparse, structured only: its own pattern, as compress's default
            job = replace(job, pattern=Pattern(kind=method.patterns[0]))
        job = replace(job, settings=method.resolve(replace(base_job.settings, loss=variant.loss), job.pattern))
        if _reusable(job.out, job, identity):
            loaded, manifest = load_checkpoint(job.out)
        else:
            outcome = compress(job)
            loaded, manifest = outcome.loaded, outcome.manifest
        ppl = _perplexities(loaded.model, loaded.tokenizer, texts, window)
        losses = [layer["relative_loss"] for layer in manifest["layers"]]
        rows.append(
            {
                "variant": variant.label,
                "method": variant.method,
                "ratio": variant.ratio,
                "loss": job.settings.loss,
                "allocation": variant.allocation,
                "perplexity": ppl,
                "perplexity_vs_dense": {name: value / dense_ppl[name] for name, value in ppl.items()},
                "params_kept": manifest["params_kept"],
                "params_total": manifest["params_total"],
                "mean_relative_loss": sum(losses) / len(losses),
                "compression_seconds": manifest["compression_seconds"],
                "threads": manifest["threads"],
            }
        )
    return rows


def _perplexities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: dict[str, str], window: int) -> dict[str, float]:
    return {name: result["perplexity"] for name, result in perplexity_per_text(model, tokenizer, texts, window).items()}
