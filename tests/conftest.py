"""Shared fixtures: tiny random LLaMA / Qwen2 folders with a small trained tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

from sslc_export.models.synthetic import build_random_model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def interrupted_after_first_block(run) -> None:
    """Runs `run()` with CheckpointWriter.save_block raising KeyboardInterrupt right after block 0 is saved (a
    crash that --resume continues from), expects that interrupt, and restores save_block."""
    from sslc_export.checkpoint import CheckpointWriter

    original = CheckpointWriter.save_block

    def crash_after_first_block(self, index, *args):
        original(self, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    CheckpointWriter.save_block = crash_after_first_block
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        CheckpointWriter.save_block = original
