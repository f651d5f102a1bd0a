"""Output paths that cannot be written, and a disk that fills mid-write: one line, a non-zero exit,
no traceback, nothing partial left (issue 14)."""
import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslc_export.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and expected in " ".join(result.output.split()), result.output


@pytest.fixture
def unwritable(tmp_path):
    """Two kinds of output parent that cannot be made: one under /proc (mkdir fails even for root, as
    `compress --out /proc/nope/out` did) and one below a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return {"proc": Path("/proc") / f"nope-{uuid.uuid4().hex[:8]}", "file": blocker}


# Every command that writes somewhere, by the output it names; inputs exist where the command would
# otherwise stop on them first (the check runs before any work, so most inputs are never opened).
COMMANDS = {
    "compress --out": lambda model, out, tmp: ["compress", "--model", model, "--out", out / "ckpt"],
    "compress --json": lambda model, out, tmp: ["compress", "--model", model, "--out", tmp / "ckpt", "--json", out / "m.json"],
    "convert": lambda model, out, tmp: ["convert", out / "hf", "--model", model],
    "export": lambda model, out, tmp: ["export", tmp / "ckpt", out / "onnx"],
    "export --dense": lambda model, out, tmp: ["export", "--dense", model, out / "onnx"],
    "export --json": lambda model, out, tmp: ["export", "--dense", model, tmp / "onnx", "--json", out / "e.json"],
    "eval --json": lambda model, out, tmp: ["eval", model, "--json", out / "eval.json"],
    "validate --json": lambda model, out, tmp: ["validate", tmp / "onnx", model, "--json", out / "v.json"],
    "sizes --report": lambda model, out, tmp: ["sizes", tmp / "onnx", "--report", out / "results.md"],
    "sizes --json": lambda model, out, tmp: ["sizes", tmp / "onnx", "--json", out / "s.json"],
    "checkpoints --report": lambda model, out, tmp: ["checkpoints", tmp / "ckpt", "--report", out / "results.md"],
    "checkpoints --json": lambda model, out, tmp: ["checkpoints", tmp / "ckpt", "--json", out / "c.json"],
    "bench --out-dir": lambda model, out, tmp: ["bench", tmp / "onnx", "--out-dir", out / "bench"],
    "bench --report": lambda model, out, tmp: ["bench", tmp / "onnx", "--report", out / "results.md"],
    "compare --work-dir": lambda model, out, tmp: ["compare", "--model", model, "--work-dir", out / "work"],
    "compare --report": lambda model, out, tmp: ["compare", "--model", model, "--report", out / "results.md"],
    "compare --json": lambda model, out, tmp: ["compare", "--model", model, "--json", out / "c.json"],
    "profile --report": lambda model, out, tmp: ["profile", tmp / "onnx", "--report", out / "results.md"],
    "profile --json": lambda model, out, tmp: ["profile", tmp / "onnx", "--json", out / "p.json"],
    "kernel-bench --report": lambda model, out, tmp: ["kernel-bench", "--report", out / "results.md"],
    "kernel-bench --json": lambda model, out, tmp: ["kernel-bench", "--json", out / "k.json"],
}


@pytest.mark.parametrize("kind", ["proc", "file"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_output_path_that_cannot_be_made_is_one_line(tiny_llama, tmp_path, unwritable, command, kind):
    before = sorted(tmp_path.rglob("*"))
    result = run(*COMMANDS[command](tiny_llama, unwritable[kind], tmp_path))
    one_line_error(result, "cannot write to")
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a partial folder
    assert not unwritable["proc"].exists()


def test_missing_parents_that_can_be_made_are_made(tiny_llama, tmp_path):
    out = tmp_path / "new" / "deeper" / "ckpt"
    result = run("compress", "--model", tiny_llama, "--out", out, "--method", "magnitude", "--nsamples", "2", "--seqlen", "16",
                 "--json", tmp_path / "json" / "here" / "m.json")
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and (tmp_path / "json" / "here" / "m.json").is_file()


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (a tiny model's ONNX export needs ~1 MB); skipped where mounting is not permitted."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the simulated case still runs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def cli_args(command, tiny_llama, out):
    return ["export", "--dense", tiny_llama, out] if command == "export" else ["convert", out, "--model", tiny_llama]


@pytest.mark.parametrize("command", ["export", "convert"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_llama, small_disk, command):
    one_line_error(run(*cli_args(command, tiny_llama, small_disk / "out")), "no space left on device")
    assert list(small_disk.iterdir()) == []  # the partial folder is removed


def test_a_write_error_in_onnx_save_is_one_line(tiny_llama, tmp_path, monkeypatch):
    """ENOSPC where the issue saw it: onnx.save of a model optimum had already exported (also the
    full-disk check where no tmpfs can be mounted)."""
    from sslc_export.onnx import onnx_io

    def no_space(model, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_io.onnx, "save_model", no_space)
    disk = tmp_path / "disk"
    disk.mkdir()
    one_line_error(run(*cli_args("export", tiny_llama, disk / "out")), "no space left on device (")
    assert list(disk.iterdir()) == []


def test_named_os_errors_and_the_rest():
    from sslc_export.errors import describe_os_error

    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/x/model.onnx")).startswith(
        "no space left on device (/x/model.onnx)")
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system")).startswith("read-only file system")
    assert describe_os_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:  # wrapped, as optimum wraps a failed save in its post-processing
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "model.onnx")
        except OSError as inner:
            raise RuntimeError("The post-processing of the ONNX export failed") from inner
    except RuntimeError as wrapped:
        assert describe_os_error(wrapped).startswith("no space left on device (model.onnx)")
    assert describe_os_error(OSError(errno.ENOENT, "No such file or directory")) is None  # a bug: keeps its traceback
    assert describe_os_error(ValueError("something else")) is None
