"""ONNX against PyTorch: the same logits at prefill and over several greedy decode steps."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from models.loading import LoadedModel
from runtimes.session import OnnxCausalLM

PROMPTS = (
    "The capital of France is",
    "Alice was beginning to get very tired of sitting by her sister",
    "def fibonacci(n):",
)


# fp32 formats must match PyTorch closely and pick identical greedy tokens. Quantized ones
# differ by construction (MatMulNBits at accuracy_level 4 also quantizes activations): their
# bound only catches a broken graph; their quality is judged by perplexity (`bench --text`).
# Measured on SmolLM2 (docs/results.md): sslc 0.5 int8 6.7e-2; sslc 0.5 int4 5.8e-1, and
# onnxruntime's own int4 of the *dense* model 6.1e-1 against dense PyTorch, so an int4 bound
# must admit ~0.6; a broken graph is far beyond it.
FP32_RTOL = 1e-3
QUANTIZED_RTOL = {"int8": 1.5e-1, "int4": 8e-1}


def default_rtol(fmt: str) -> float:
    return QUANTIZED_RTOL.get(fmt.removesuffix("-baseline"), FP32_RTOL)


@dataclass
class ValidationReport:
    max_abs_error: float
    max_relative_error: float  # max |Δlogit| / max |logit|, over every compared step
    greedy_agreement: float  # fraction of decode steps where both pick the same token
    steps: int
    rtol: float
    require_same_tokens: bool = True

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
    for prompt in prompts:
        ids = reference.tokenizer(prompt, return_tensors="pt").input_ids
        cache = DynamicCache()
        past = runtime.empty_past()
        torch_ids, onnx_ids = ids, ids.numpy()
        for _ in range(decode_steps + 1):
            with torch.no_grad():
                out = reference.model(input_ids=torch_ids, past_key_values=cache, use_cache=True)
            expected = out.logits[0, -1].numpy()
            logits, past = runtime.step(onnx_ids, past)
            actual = logits[0, -1]
            diff = float(np.abs(actual - expected).max())
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / float(np.abs(expected).max()))
            torch_next, onnx_next = int(expected.argmax()), int(actual.argmax())
            agree += torch_next == onnx_next
            steps += 1
            torch_ids = torch.tensor([[torch_next]])
            onnx_ids = np.array([[torch_next]])  # both continue from the reference token, so errors do not compound
    return ValidationReport(abs_err, rel_err, agree / steps, steps, rtol, require_same_tokens)
