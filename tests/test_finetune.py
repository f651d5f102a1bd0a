"""finetune: only U and V move, the parent's other tensors stay bit-identical, the loss falls, --resume ends
where an uninterrupted run ends, the child names its parent, bad input is one line and leaves nothing."""
import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.models.synthetic import build_random_model
from sslc_export.atomic import partial_path, sha256_file
from sslc_export.checkpoint import block_file, load_checkpoint, read_manifest
from sslc_export.compress import CompressJob, compress
from sslc_export.finetune import FinetuneJob, finetune
from sslc_export.methods import Settings
from sslc_export.onnx.build import export_checkpoint_dir
from sslc_export.onnx.formats import sparse
from sslc_export.onnx.validate import validate
from test_cli_errors import assert_clean_failure

TRAINED = ("u", "v", "u_q", "v_q", "u_scales", "v_scales")  # on a grid: U and V's integers and their scales
SMALL = dict(steps=6, seqlen=32, batch_size=2, lr=1e-2, grid_lr=0.3, save_every=2)


@pytest.fixture(scope="module", params=[32, 4], ids=["fp32", "int4"])
def parent(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("parent") / f"sslc-b{request.param}"
    # refit_rounds=0: a parent left with something to learn (refitted, the tiny model's distillation loss starts
    # within its step-to-step noise).
    compress(CompressJob(out=out, model=str(tiny_llama), nsamples=8, seqlen=32, batch_size=4,
                         settings=Settings(iters=3, bits=request.param, group_size=16, refit_rounds=0)))
    return out


def tensors(folder, index=0):
    return load_file(str(folder / block_file(index)))


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_only_u_and_v_change(parent, tmp_path):
    out = tmp_path / "tuned"
    manifest = finetune(FinetuneJob(parent, out, sparse_scales=None if "b32" in parent.name else False, **SMALL))
    for index in range(manifest["num_blocks"]):
        before, after = tensors(parent, index), tensors(out, index)
        assert before.keys() == after.keys()
        for key in before:
            part = key.rsplit(".", 1)[1]
            if part in TRAINED:
                continue
            assert torch.equal(before[key], after[key]), key  # S's mask, values or integers, scales, biases
        moved = [key for key in before if key.rsplit(".", 1)[1] in TRAINED and not torch.equal(before[key], after[key])]
        assert len(moved) >= len(before) // 4, moved
        if "b4" in parent.name:  # the integers themselves cross rounding boundaries, not only the scales
            assert any(key.endswith(("u_q", "v_q")) for key in moved), moved
    for name in ("dense.safetensors", "config.json", "tokenizer.json"):
        assert sha256_file(out / name) == sha256_file(parent / name)  # embeddings, norms, head: the parent's bytes
    child, _ = load_checkpoint(out)  # a quantized child still passes the grid check on load
    original, _ = load_checkpoint(parent)
    tokens = torch.randint(0, child.model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert not torch.equal(child.model(tokens).logits, original.model(tokens).logits)


@pytest.mark.parametrize("loss, lr, drop", [("distill", 1e-2, 0.9), ("lm", 3e-2, 0.98)])  # a random model has little text to learn
def test_loss_decreases(parent, tmp_path, loss, lr, drop):
    if "b4" in parent.name and loss == "lm":
        pytest.skip("one loss is enough on the grid")
    rates = {"lr": lr, "grid_lr": 0.2, "scale_lr": 1e-2}  # the grid's rates act on an int4 parent, lr on an fp32 one
    losses = finetune(FinetuneJob(parent, tmp_path / "tuned", loss=loss, **{**SMALL, "steps": 24, **rates}))["finetune"]["losses"]
    assert sum(losses[-6:]) / 6 < drop * sum(losses[:6]) / 6, losses


def test_resume_gives_the_same_checkpoint(parent, tmp_path):
    whole = finetune(FinetuneJob(parent, tmp_path / "whole", **SMALL))

    def interrupt(step, steps, loss):
        if step == 5:
            raise KeyboardInterrupt

    job = FinetuneJob(parent, tmp_path / "resumed", **SMALL)
    with pytest.raises(KeyboardInterrupt):
        finetune(job, interrupt)
    assert json.loads((partial_path(job.out) / "finetune-progress.json").read_text())["step"] == 4
    with pytest.raises(Exception, match="pass --resume"):
        finetune(job)
    resumed = finetune(FinetuneJob(parent, tmp_path / "resumed", resume=True, **SMALL))
    assert resumed["finetune"]["losses"] == whole["finetune"]["losses"]
    for index in range(whole["num_blocks"]):
        expected, actual = tensors(tmp_path / "whole", index), tensors(tmp_path / "resumed", index)
        assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert not partial_path(job.out).exists()


def test_resume_refuses_other_settings(parent, tmp_path):
    def interrupt(step, steps, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneJob(parent, tmp_path / "tuned", **SMALL), interrupt)
    with pytest.raises(Exception, match="other settings"):
        finetune(FinetuneJob(parent, tmp_path / "tuned", resume=True, **{**SMALL, "seed": 1}))


def test_manifest_names_its_parent_and_settings(parent, tmp_path):
    manifest = finetune(FinetuneJob(parent, tmp_path / "tuned", loss="distill", **SMALL))
    assert read_manifest(tmp_path / "tuned") == manifest  # every file hashed, as for compress
    record = manifest["finetune"]
    assert record["parent"]["manifest_sha256"] == sha256_file(parent / "manifest.json")
    assert record["settings"]["loss"] == "distill" and record["settings"]["steps"] == SMALL["steps"]
    assert record["teacher"]["sha256"] == read_manifest(parent)["source_model"]["sha256"]
    assert record["seconds"] > 0 and len(record["losses"]) == SMALL["steps"] and record["finished"]
    assert manifest["fingerprint"] != read_manifest(parent)["fingerprint"]  # compare never reuses it as its parent
    assert (record["quantized_factors"] is None) == ("b32" in parent.name)
    assert manifest["format_version"] == read_manifest(parent)["format_version"] == (1 if "b32" in parent.name else 3)
    rates = {"lr"} if "b32" in parent.name else {"grid_lr", "scale_lr"}  # only the rates that acted on this parent
    assert rates == {"lr", "grid_lr", "scale_lr"} & record["settings"].keys()


def test_cli_trains_and_prints_the_loss(parent, tmp_path):
    """Without --loss: cross-entropy for an fp32 parent, distillation on a grid (each the better one measured)."""
    out = tmp_path / "tuned"
    result = run_cli("finetune", parent, "--out", out, "--steps", 2, "--seqlen", 32, "--batch-size", 1)
    assert result.exit_code == 0, result.output
    expected = "lm" if "b32" in parent.name else "distill"
    assert f"{expected} loss" in result.output and read_manifest(out)["finetune"]["settings"]["loss"] == expected


@pytest.mark.parametrize("flags, expected", [
    (["--loss", "mse"], "--loss must be one of"),
    (["--steps", 0], "--steps"),
    (["--lr", -1], "--lr must be a positive number"),
    (["--seqlen", 1], "--seqlen must be >= 2"),
    (["--seqlen", 100000], "longer than the model's"),
    (["--calib", "no-such-text"], "does not exist"),
])
def test_bad_flags_are_one_line_and_leave_nothing(parent, tmp_path, flags, expected):
    out = tmp_path / "tuned"
    assert_clean_failure(run_cli("finetune", parent, "--out", out, *flags), out, expected)


def test_bad_sources_are_one_line_and_leave_nothing(parent, tmp_path):
    out = tmp_path / "tuned"
    assert_clean_failure(run_cli("finetune", tmp_path / "nothing", "--out", out), out, "not a complete sslc-export checkpoint")
    assert_clean_failure(run_cli("finetune", parent, "--out", parent), parent / "x", "--out must differ")
    other = build_random_model(tmp_path / "other", "llama", seed=1)
    assert_clean_failure(run_cli("finetune", parent, "--out", out, "--loss", "distill", "--teacher", other), out,
                         "is not the model the checkpoint")
    assert_clean_failure(run_cli("finetune", parent, "--out", out, "--loss", "lm", "--teacher", other), out,
                         "--teacher is only read by --loss distill")
    default_loss_error = "--teacher is only read by --loss distill" if "b32" in parent.name else "is not the model the checkpoint"
    assert_clean_failure(run_cli("finetune", parent, "--out", out, "--teacher", other), out, default_loss_error)
    out.mkdir()
    result = run_cli("finetune", parent, "--out", out)
    assert result.exit_code == 2 and "already exists" in result.output


def test_fp32_factors_are_balanced_before_training(parent, tmp_path):
    """Adam moves every entry by about lr: the parent's U (singular values inside) and V differ by orders of
    magnitude, so they are rescaled to equal norms per rank-1 term first, U·V unchanged."""
    if "b4" in parent.name:
        pytest.skip("a quantized checkpoint's factors are balanced by compress and stay on their grid")
    finetune(FinetuneJob(parent, tmp_path / "tuned", **{**SMALL, "steps": 1, "lr": 1e-12}))
    before, after = tensors(parent), tensors(tmp_path / "tuned")
    for key in [key for key in before if key.endswith(".u")]:
        v_key = key[:-2] + ".v"
        u, v = after[key], after[v_key]
        assert torch.allclose(u @ v, before[key] @ before[v_key], rtol=1e-4, atol=1e-6), key
        assert torch.allclose(u.norm(dim=0), v.norm(dim=1), rtol=1e-3), key


def test_sparse_scales_move_only_s_scales(parent, tmp_path):
    """On a grid S's per-group scales are trained by default; its integers and mask stay the parent's bytes."""
    if "b32" in parent.name:
        assert_clean_failure(run_cli("finetune", parent, "--out", tmp_path / "tuned", "--sparse-scales"), tmp_path / "tuned",
                             "--sparse-scales needs a quantized checkpoint")
        return
    manifest = finetune(FinetuneJob(parent, tmp_path / "tuned", **SMALL))
    before, after = tensors(parent), tensors(tmp_path / "tuned")
    for key in before:
        part = key.rsplit(".", 1)[1]
        if part == "s_scales":
            assert not torch.equal(before[key], after[key]), key
        elif part not in TRAINED:
            assert torch.equal(before[key], after[key]), key  # S's integers and mask, biases
    child, _ = load_checkpoint(tmp_path / "tuned")  # stored scales and integers still pass the grid check
    assert "S's scales trained" in manifest["finetune"]["quantized_factors"] and manifest["finetune"]["settings"]["sparse_scales"]


def test_grid_finetune_exports_its_integers_and_trained_scales(parent, tmp_path, monkeypatch):
    """The trained integers and scales (S's too) are what sparse-int4 writes: fp32 activations match at fp32 tolerance."""
    if "b32" in parent.name:
        pytest.skip("an fp32 child exports as its parent does")
    finetune(FinetuneJob(parent, tmp_path / "tuned", sparse_scales=True, **SMALL))
    monkeypatch.setattr(sparse, "ACTIVATION_BITS", 32)
    record = export_checkpoint_dir(tmp_path / "tuned", tmp_path / "onnx", "sparse-int4")
    report = validate(tmp_path / "onnx", load_checkpoint(tmp_path / "tuned")[0], rtol=record["rtol"], require_same_tokens=True)
    assert record["rtol"] == 1e-5 and report.passed, report
