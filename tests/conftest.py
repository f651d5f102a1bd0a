"""Shared fixtures: tiny random LLaMA / Qwen2 folders with a small trained tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

from models.synthetic import build_random_model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_random_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
