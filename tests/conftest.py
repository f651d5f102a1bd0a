"""Shared fixtures: tiny random LLaMA / Qwen2 folders with a small trained tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sslc_export.models.synthetic import build_random_model


# Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores, so that two
# workers' torch thread pools do not fight over the same ones.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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
