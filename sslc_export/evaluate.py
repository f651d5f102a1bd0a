"""Quality: token perplexity over fixed windows, and a greedy generation as a sanity check."""
from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sslc_export import defaults
from sslc_export.errors import UserError



def torch_logits(model: PreTrainedModel) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda chunk: model(chunk).logits[0]


def perplexity(
    model: PreTrainedModel | Callable[[torch.Tensor], torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int = defaults.WINDOW,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """exp(mean token NLL) over every token but the first, each scored exactly once.
    Windows advance by `stride`, so stride < window gives every scored token at least
    window - stride tokens of context (stride = window: non-overlapping windows).

    `model` is a torch model or any function from token ids (1 x L) to logits (L x vocab),
    so an onnxruntime session is scored by exactly the same code."""
    logits_of = model if not isinstance(model, torch.nn.Module) else torch_logits(model)
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise UserError(f"need --window >= 2 and 0 < --stride <= --window, got window {window}, stride {stride}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise UserError("the evaluation text has fewer than 2 tokens: pass a longer --text")
    # Each step scores the targets [first, last) with up to `window` tokens of context; a step of
    # at most window - 1 keeps one token of context for the first target, so none is skipped.
    step = min(stride, window - 1)
    firsts = range(1, ids.numel(), step)
    total_nll, scored = 0.0, 0
    with torch.no_grad():
        for index, first in enumerate(firsts):
            last = min(first + step, ids.numel())
            chunk = ids[max(0, last - window) : last].unsqueeze(0)
            fresh = last - first
            logits = logits_of(chunk)[:-1].float()
            nll = torch.nn.functional.cross_entropy(logits[-fresh:], chunk[0, -fresh:], reduction="sum")
            total_nll += float(nll)
            scored += fresh
            if progress:
                progress(index + 1, len(firsts))
    return {"perplexity": math.exp(total_nll / scored), "tokens": scored, "window": window, "stride": stride}


def perplexity_per_text(
    model: PreTrainedModel | Callable[[torch.Tensor], torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    texts: dict[str, str],
    window: int = defaults.WINDOW,
    stride: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict]:
    """`perplexity` on each named text: a figure from one domain hides what a method overfits to."""
    results = {}
    for name, text in texts.items():
        step = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        results[name] = perplexity(model, tokenizer, text, window, stride, step)
    return results


def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 32) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
