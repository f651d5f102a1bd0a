"""Mutated and truncated files fed to every loader: a clear UserError, never a traceback or a silent load."""
import random
import shutil

import pytest

from sslc_export.models.loading import load_model
from sslc_export.checkpoint import load_checkpoint
from sslc_export.compress import CompressJob, compress
from sslc_export.errors import UserError
from sslc_export.methods import Settings
from sslc_export.onnx.build import export_checkpoint_dir

MUTATIONS = 6


def mutate(path, rng):
    data = bytearray(path.read_bytes())
    if rng.random() < 0.5:
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))  # truncated
    else:
        for _ in range(8):
            data[rng.randrange(len(data))] ^= 0xFF  # flipped bytes
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "ckpt"
    compress(CompressJob(out=folder, model=str(tiny_llama), settings=Settings(iters=2), nsamples=4, seqlen=32))
    return folder


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_mutated_checkpoint_files_are_refused(checkpoint_dir, tmp_path, seed):
    rng = random.Random(seed)
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, copy)
    victim = rng.choice(sorted(p for p in copy.rglob("*") if p.is_file()))
    mutate(victim, rng)
    with pytest.raises(UserError):
        load_checkpoint(copy)


@pytest.mark.parametrize("seed", range(MUTATIONS))
def test_mutated_model_safetensors_is_refused(tiny_llama, tmp_path, seed):
    rng = random.Random(seed)
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama, copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: rng.randrange(8, len(data) // 2)])  # a header cut short or missing tensors
    with pytest.raises(UserError):
        load_model(str(copy))


@pytest.mark.parametrize("cut", [0, 4, 24, 1000])
def test_truncated_gguf_is_refused(tmp_path, cut):
    from sslc_export.models.loading import default_model_path

    with default_model_path().open("rb") as source:
        head = source.read(cut)
    bad = tmp_path / "model.gguf"
    bad.write_bytes(head)
    with pytest.raises(UserError, match="GGUF"):
        load_model(str(bad))


@pytest.mark.parametrize("seed", range(3))
def test_mutated_onnx_export_is_refused(checkpoint_dir, tmp_path, seed):
    from sslc_export.cli import app
    from typer.testing import CliRunner

    export_checkpoint_dir(checkpoint_dir, tmp_path / "onnx", "dense")
    mutate(tmp_path / "onnx" / "model.onnx", random.Random(seed))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "onnx"), str(checkpoint_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    from sslc_export.runtimes.session import OnnxCausalLM

    if (tmp_path / "onnx" / "model.onnx").stat().st_size < 100:
        with pytest.raises(UserError):
            OnnxCausalLM(tmp_path / "onnx")


def test_garbage_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid model config"):
        load_model(str(tmp_path))
