"""ONNX against PyTorch: the same logits at prefill and over several greedy decode steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from sslc_export.models.loading import LoadedModel
from sslc_export.runtimes.session import OnnxCausalLM
from sslc_export.checkpoint import checkpoint_grid, read_block, read_manifest
from sslc_export.layers import SparseLowRankLinear, replace_linear
from sslc_export.onnx.formats import get_format
from sslc_export.onnx.formats.base import FP32_RTOL

PROMPTS = (
    "The capital of France is",
    "Alice was beginning to get very tired of sitting by her sister",
    "def fibonacci(n):",
)


def default_rtol(record: dict) -> float:
    """The tolerance export.json records for its format (older exports: looked up by name)."""
    if "rtol" in record:
        return float(record["rtol"])
    return get_format(record["format"].removesuffix("-baseline")).rtol


def exact_reference(record: dict, checkpoint: Path, loaded: LoadedModel) -> LoadedModel:
    """For formats that quantize inside their own operator, the checkpoint's model with exactly the
    dequantized factors the ONNX holds, so that it is checked at fp32 tolerance; others unchanged."""
    fmt = get_format(record["format"]) if record.get("compressed_layers") else None
    if fmt is None or not fmt.layout.quantizes_itself or fmt.bits == 32:
        return loaded
    manifest = read_manifest(checkpoint)
    for index in range(manifest["num_blocks"]):
        for name, layer in read_block(checkpoint, index, checkpoint_grid(manifest)).items():
            exact = fmt.reference(layer)
            replace_linear(loaded.model, name, SparseLowRankLinear(exact.sparse, exact.u, exact.v, exact.bias))
    return loaded


@dataclass
class ValidationReport:
    max_abs_error: float
    max_relative_error: float  # max |Δlogit| / max |logit|, over every position of every compared step
    greedy_agreement: float  # fraction of decode steps where both pick the same token
    steps: int
    rtol: float
    require_same_tokens: bool = True
    worst_at: str = ""  # where the max relative error sits: the prompt, the token's index and text

    @property
    def passed(self) -> bool:
        tokens_ok = self.greedy_agreement == 1.0 or not self.require_same_tokens
        return self.max_relative_error <= self.rtol and tokens_ok

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def validate(onnx_dir: Path, reference: LoadedModel, decode_steps: int = 8, rtol: float = FP32_RTOL,
             prompts: tuple[str, ...] = PROMPTS, require_same_tokens: bool = True) -> ValidationReport:
    runtime = OnnxCausalLM(onnx_dir)
    abs_err = rel_err = 0.0
    agree = steps = 0
    worst_at = ""
    for prompt in prompts:
        ids = reference.tokenizer(prompt, return_tensors="pt").input_ids
        cache = DynamicCache()
        past = runtime.empty_past()
        torch_ids, onnx_ids = ids, ids.numpy()
        offset = 0  # index in prompt + continuation of this step's first position
        for _ in range(decode_steps + 1):
            with torch.no_grad():
                out = reference.model(input_ids=torch_ids, past_key_values=cache, use_cache=True)
            expected = out.logits[0].numpy()  # every position of the prefill, then each decode step's
            logits, past = runtime.step(onnx_ids, past)
            actual = logits[0]
            per_position = np.abs(actual - expected).max(axis=-1)  # max |Δlogit| at each position
            abs_err = max(abs_err, float(per_position.max()))
            per_position /= np.abs(expected).max()
            if per_position.max() > rel_err:
                rel_err, where = float(per_position.max()), int(per_position.argmax())
                token = reference.tokenizer.decode(torch_ids[0, where])
                worst_at = f"prompt {prompt[:24]!r}…, token {offset + where} {token!r}"
            offset += torch_ids.shape[1]
            torch_next, onnx_next = int(expected[-1].argmax()), int(actual[-1].argmax())
            agree += torch_next == onnx_next
            steps += 1
            torch_ids = torch.tensor([[torch_next]])
            onnx_ids = np.array([[torch_next]])  # both continue from the reference token, so errors do not compound
    return ValidationReport(abs_err, rel_err, agree / steps, steps, rtol, require_same_tokens, worst_at)
