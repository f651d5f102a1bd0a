"""Every bad input: a one-line error naming the problem, exit code 2, and nothing written."""
import json
import os

import pytest
from typer.testing import CliRunner

from sslc_export.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, out, expected):
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "error:" in message and expected in message, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("It is a truth universally acknowledged. " * 200)
    return path


@pytest.mark.parametrize("ratio", ["0", "1", "-1", "nan", "1.5"])
def test_bad_ratio(tiny_llama, tmp_path, ratio):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tiny_llama, "--out", out, "--ratio", ratio), out, "--ratio must be")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--method", "pruneall"], "unknown method 'pruneall'"),
        (["--pattern", "diagonal"], "unknown pattern 'diagonal'"),
        (["--pattern", "nm", "--nm", "2-4"], "--nm must look like N:M"),
        (["--rank-ratio", "1.0"], "leaves no low-rank or no sparse budget"),
        (["--rank-ratio", "0"], "leaves no low-rank or no sparse budget"),
        (["--method", "sparsegpt", "--pattern", "structured"], "does not support --pattern structured"),
        (["--method", "wanda", "--loss", "exact"], "has no --loss exact"),
        (["--loss", "exact", "--pattern", "structured"], "--loss exact has no structured"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--refit-rounds", "-1"], "--refit-rounds must be >= 0"),
        (["--pattern", "nm", "--ratio", "0.7"], "use --ratio <= 0.50"),
        (["--device", "quantum"], "--device"),
        (["--damp", "0"], "--damp must be in (0, 1.0]"),
        (["--damp", "-0.01"], "--damp must be in (0, 1.0]"),
        (["--damp", "1.5"], "--damp must be in (0, 1.0]"),
        (["--damp", "nan"], "--damp must be in (0, 1.0]"),
        (["--calib", "poetry"], "is not a bundled text (prose, technical, code)"),
        (["--pattern", "nm", "--ratio", "0.5"], "no parameters for U, V"),  # sslc would silently be N:M pruning
        (["--preset", "fast"], "unknown --preset 'fast': choose one of paper"),
        (["--method", "wanda", "--preset", "paper"], "use it with --method sslc"),
        (["--targets", "ffn"], "unknown --targets 'ffn': choose one of all, attn, mlp"),
        (["--method", "hss", "--pattern", "nm"], "does not support --pattern nm"),
        (["--method", "hss", "--bits", "4"], "method hss has no --bits 4"),
        (["--method", "hss", "--ratio", "0.9"], "hss: a 64x64 layer cannot hold its dense 8-wide diagonal blocks"),
    ],
)
def test_bad_method_settings(tiny_llama, tmp_path, flags, expected):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tiny_llama, "--out", out, *flags), out, expected)


def test_missing_model(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tmp_path / "nope", "--out", out), out, "does not exist")


def test_model_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tmp_path / "empty", "--out", out), out, "has no config.json")


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", folder, "--out", out), out, "unsupported architecture 'gpt2'")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", bad, "--out", out), out, "could not read GGUF file")


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty"),
        (b"   \n\n", "is empty"),
        (b"\x00\x01\x02binary", "looks binary"),
        (b"\xff\xfe\xfa not utf8", "is not UTF-8"),
        (b"too short", "shorter than one sequence"),
    ],
)
def test_bad_calibration_text(tiny_llama, tmp_path, content, expected):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tiny_llama, "--out", out, "--calib", calib), out, expected)


def test_missing_calibration_file(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run("compress", "--model", tiny_llama, "--out", out, "--calib", tmp_path / "nope.txt"), out, "does not exist")


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run("compress", "--model", tiny_llama, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so a read-only folder does not stop it")
def test_unwritable_output(tiny_llama, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = locked / "out"
    assert_clean_failure(run("compress", "--model", tiny_llama, "--out", out), out, "cannot write")


def test_output_under_a_file_is_refused(tiny_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    result = run("compress", "--model", tiny_llama, "--out", out)
    assert result.exit_code == 2 and "cannot write" in result.output


def test_eval_of_an_unfinished_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "progress.json").write_text("{}")
    result = run("eval", folder)
    assert result.exit_code == 2 and "not a complete sslc-export checkpoint" in result.output


def test_eval_bad_window(tiny_llama, calib_file):
    result = run("eval", tiny_llama, "--text", calib_file, "--window", "1")
    assert result.exit_code == 2 and "--window" in result.output


def test_compress_and_eval_write_json(tiny_llama, tmp_path, calib_file):
    out = tmp_path / "ckpt"
    figures = tmp_path / "compress.json"
    result = run("compress", "--model", tiny_llama, "--out", out, "--calib", calib_file, "--nsamples", 4, "--seqlen", 32,
                 "--iters", 3, "--json", figures)
    assert result.exit_code == 0, result.output
    manifest = json.loads(figures.read_text())
    assert 0 < manifest["params_kept"] <= manifest["params_total"] // 2 + 14
    evaluation = tmp_path / "eval.json"
    result = run("eval", out, "--text", calib_file, "--window", 64, "--max-new-tokens", 4, "--json", evaluation)
    assert result.exit_code == 0, result.output
    assert json.loads(evaluation.read_text())["heldout"]["calib"]["perplexity"] > 1
    report = tmp_path / "report.md"
    report.write_text("<!-- BEGIN timing -->\n<!-- END timing -->\n")
    result = run("checkpoints", out, "--report", report, "--section", "timing")
    assert result.exit_code == 0, result.output
    row = report.read_text().splitlines()[-2]  # the table's only row, above the END marker
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "ckpt" and cells[5] == "cpu"
    assert 0 < float(cells[8]) <= float(cells[7]) == manifest["compression_seconds"]  # decompositions inside the wall time


@pytest.mark.parametrize("flag", ["--rounds", "--repeats", "--decode-tokens"])
def test_bench_refuses_counts_below_one(tmp_path, flag):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(tmp_path), flag, "0", "--out-dir", str(out)])
    assert_clean_failure(result, out, "must be >= 1")


@pytest.mark.parametrize("command,option,value", [
    (["kernel-bench"], "--rows", "1,x"), (["kernel-bench"], "--rows", "0"),
    (["bench", "x"], "--prompt-lengths", "16,-4"), (["bench", "x"], "--prompt-lengths", ","),
])
def test_bad_integer_lists(tmp_path, command, option, value):
    """Row counts and prompt lengths: positive integers, or one line naming the option, before any work."""
    out = tmp_path / "report.md"
    result = run(*command, option, value, "--report", out)
    assert_clean_failure(result, out, f"{option} must be comma-separated positive integers, got '{value}'")
