"""Calibration text -> token batches, and the per-input statistics methods consume.

Statistics are accumulated SparseGPT-style through `add_batch`, so the block walker can
stream activations through hooks without keeping them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from sslc_export.errors import UserError

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "calibration.txt"  # Pride and Prejudice ch. II-XXX (Project Gutenberg #1342, public domain)
DEFAULT_HELDOUT_TEXT = DATA_DIR / "heldout.txt"  # Alice's Adventures in Wonderland (Project Gutenberg #11, public domain)
TEXT_SUFFIXES = (".txt", ".md", ".text")


def read_text(path: Path) -> str:
    """One file, or every .txt/.md file of a folder in name order; must be non-empty UTF-8 text."""
    if not path.exists():
        raise UserError(f"text path {path} does not exist: pass a UTF-8 text file or a folder of .txt files")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UserError(f"folder {path} holds no .txt or .md files")
    parts = []
    for file in files:
        raw = file.read_bytes()
        if b"\x00" in raw:
            raise UserError(f"{file} looks binary (it contains NUL bytes): pass a UTF-8 text file")
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise UserError(f"{path} is empty: pass a text with at least one calibration sequence")
    return text


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
