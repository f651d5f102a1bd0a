"""Token-by-token generation on an onnxruntime session: greedy or sampled, stopping at the
model's real end token, yielding text as it comes."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from sslc_export.runtimes.session import OnnxCausalLM
from sslc_export.errors import UserError


def next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    scaled = (logits - logits.max()) / temperature
    probs = np.exp(scaled)
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # nucleus: smallest set with mass >= top_p
    return int(rng.choice(keep, p=probs[keep] / probs[keep].sum()))


def generate(
    runtime: OnnxCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[tuple[int, str]]:
    """Yield (token id, new text) per generated token; stops at eos or max_new_tokens."""
    if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    ids = tokenizer(prompt, return_tensors="np").input_ids
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty: pass --prompt TEXT")
    rng = np.random.default_rng(seed)
    past = runtime.empty_past()
    generated: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        logits, past = runtime.step(ids, past)
        token = next_token(logits[0, -1], temperature, top_p, rng)
        if token == tokenizer.eos_token_id:
            return
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        yield token, text[len(shown):]
        shown = text
        ids = np.array([[token]], dtype=np.int64)
