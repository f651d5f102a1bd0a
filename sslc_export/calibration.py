"""Calibration text -> token batches, and the per-input statistics methods consume.

Statistics are accumulated SparseGPT-style through `add_batch`, so the block walker can
stream activations through hooks without keeping them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from sslc_export.corpus import NamedText, calibration_texts, read_text
from sslc_export.errors import UserError


def token_batches(
    tokenizer: PreTrainedTokenizerBase, text: str, nsamples: int, seqlen: int, seed: int, source: str = "text"
) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens drawn at seeded random offsets (as SparseGPT and Wanda sample C4)."""
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"--nsamples must be >= 1 and --seqlen >= 2, got {nsamples} and {seqlen}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seqlen:
        raise UserError(
            f"calibration {source} has {ids.numel()} tokens, shorter than one sequence of --seqlen {seqlen}: "
            "pass a longer text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration texts of one run, read (and so checked) before any model is loaded.

    `nsamples` is split in equal shares across the texts (the first ones take the remainder), so a
    long text does not outweigh a short domain; each share is drawn with the run's seed, so one
    text alone samples exactly the windows a single-text run always did."""

    texts: tuple[NamedText, ...]
    contents: tuple[str, ...]

    @classmethod
    def read(cls, choice: str | None) -> CalibrationSet:
        texts = tuple(calibration_texts(choice))
        return cls(texts, tuple(read_text(text.path) for text in texts))

    def shares(self, nsamples: int) -> list[int]:
        return [nsamples // len(self.texts) + (index < nsamples % len(self.texts)) for index in range(len(self.texts))]

    def tokens(self, tokenizer: PreTrainedTokenizerBase, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
        if nsamples < 1:
            raise UserError(f"--nsamples must be >= 1, got {nsamples}")
        batches = [
            token_batches(tokenizer, content, share, seqlen, seed, str(text.path))
            for text, content, share in zip(self.texts, self.contents, self.shares(nsamples))
            if share
        ]
        return torch.cat(batches)

    def record(self, nsamples: int) -> list[dict]:
        """What the manifest keeps: each text's name, path, hash and number of sequences."""
        return [
            {"name": text.name, "path": str(text.path), "sha256": hashlib.sha256(content.encode()).hexdigest(), "sequences": share}
            for text, content, share in zip(self.texts, self.contents, self.shares(nsamples))
        ]


class InputStatistics:
    """Gram matrix XᵀX of one Linear's input over all calibration tokens.

    Its diagonal gives the column norms ‖X_j‖ (Wanda, SSLC scaling); the whole matrix gives
    the exact loss ‖(W - Ŵ)X‖ and the OBS Hessian.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(in_features, in_features, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        self.gram.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]

    @property
    def column_norms(self) -> torch.Tensor:
        return self.gram.diagonal().clamp_min(0).sqrt()

    def error_energy(self, error: torch.Tensor) -> torch.Tensor:
        """‖E X‖_F² = tr(E XᵀX Eᵀ)."""
        return ((error @ self.gram) * error).sum().clamp_min(0)

    def relative_error(self, weight: torch.Tensor, approximation: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """‖(W - Ŵ)X‖_F / ‖WX‖_F; pass reference = error_energy(W) when calling repeatedly for one W."""
        if reference is None:
            reference = self.error_energy(weight)
        return float((self.error_energy(weight - approximation) / reference.clamp_min(1e-30)).sqrt())
