"""compress under a launcher (sslc_export/distributed.py), on the CPU with gloo: the checkpoint of 2 processes is the
one of a plain process, bit for bit (fresh and resumed); a failure on one rank stops every rank with one line and
publishes nothing. The plain reference runs in this process with one thread, as each rank does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupted_after_first_block
from sslc_export.allocation import Allocation
from sslc_export.compress import CompressJob, compress
from sslc_export.distributed import World, _failure_message, free_port

REPO = Path(__file__).resolve().parents[1]
# --allocation global too: its loss curves are shared out like the decompositions, so the split must not move either.
FLAGS = ["--nsamples", "8", "--seqlen", "64", "--threads", "1", "--allocation", "global", "--min-keep", "0.3", "--max-keep", "0.7"]
TIMING = ("created", "compression_seconds", "peak_rss_bytes", "distributed", "memory_limits")
# A rank's failure planted before the CLI runs: `where` raises on rank 1 only.
PLANTED = """
import os, sys
from sslc_export.errors import UserError
import sslc_export.compress, sslc_export.methods.sslc
where, message = sys.argv[1], sys.argv[2]
def fail(*args, **kwargs):
    raise (UserError if where == "decompose" else RuntimeError)(message)
if os.environ["RANK"] == "1":
    if where == "decompose":  # inside a shared step
        sslc_export.methods.sslc.Sslc.decompose = fail
    else:  # between shared steps: rank 0 is already waiting for the first group's results
        sslc_export.compress.walk_block = fail
sys.argv = ["sslc-export", *sys.argv[3:]]
import sslc_export.cli as cli
cli.main()
"""


def environment(**extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def compress_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["compress", "--model", str(model), "--out", str(out), *FLAGS, *extra]


def job(model: Path, out: Path) -> CompressJob:
    """compress_args's compression, in this process."""
    return CompressJob(out=out, model=str(model), nsamples=8, seqlen=64, allocation=Allocation("global", 0.3, 0.7))


@contextmanager
def one_thread():
    """Torch in this process computing as each rank does (OMP_NUM_THREADS=1): the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "cli.py", *args]
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)


def run_ranks(processes: int, code: str, args: list[str]) -> list[subprocess.CompletedProcess]:
    """What torchrun does, without its agent (which would stop the others itself): one process per rank."""
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=environment(WORLD_SIZE=str(processes), RANK=str(rank), LOCAL_RANK=str(rank),
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(processes)]
    results = []
    for rank in ranks:
        stdout, stderr = rank.communicate(timeout=300)  # a rank left waiting in a collective would hang here
        results.append(subprocess.CompletedProcess(rank.args, rank.returncode, stdout, stderr))
    return results


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plain") / "ckpt"
    with one_thread():
        compress(job(tiny_llama, folder))
    return folder


def read(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_owners_are_balanced_and_cover_every_layer():
    assert World().owners([5, 1, 1]) == [0, 0, 0]
    assert World(size=2, rank=1).owners([9, 3, 3]) == [0, 1, 1]  # q alone, k and v together
    assert World(size=2).owners([4, 4]) == [0, 1]
    assert World(size=4).owners([7]) == [0]


def test_failure_message_names_the_rank_unless_every_rank_failed_alike():
    assert _failure_message({0: "bad --ratio", 1: "bad --ratio"}, 2) == "bad --ratio"  # bad input: as a plain run says it
    assert _failure_message({1: "boom"}, 2) == "rank 1 of 2 failed, so every rank stopped: boom"
    assert _failure_message({2: "b", 1: "a"}, 4) == "rank 1 of 4 failed (and 1 more rank(s)), so every rank stopped: a"


def test_two_processes_write_the_checkpoint_of_one(tiny_llama, tmp_path, reference):
    launched = run_torchrun(2, compress_args(tiny_llama, tmp_path / "two"))
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count("checkpoint written to") == 1  # rank 0 alone reports

    one, two = read(reference), read(tmp_path / "two")
    assert one["files"] == two["files"]  # every file, hash for hash
    for name in one["files"]:
        if name.endswith(".safetensors"):
            a, b = load_file(reference / name), load_file(tmp_path / "two" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype for key in a)
    untimed = lambda manifest: {key: value for key, value in manifest.items() if key not in TIMING + ("layers", "allocation")}
    assert untimed(one) == untimed(two)
    assert [{**layer, "seconds": 0} for layer in one["layers"]] == [{**layer, "seconds": 0} for layer in two["layers"]]
    assert {**one["allocation"], "seconds": 0} == {**two["allocation"], "seconds": 0}
    assert one["distributed"]["world_size"] == 1 and one["distributed"]["backend"] is None
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"
    assert [rank["device"] for rank in two["distributed"]["ranks"]] == ["cpu", "cpu"]
    assert all(rank["peak_rss_bytes"] > 0 for rank in two["distributed"]["ranks"])
    assert not (tmp_path / ".two.partial").exists()


def test_two_processes_resume_a_plain_run(tiny_llama, tmp_path, reference):
    """Rank 0 reads the progress, the split and the saved activations and hands them to rank 1."""
    with one_thread():
        interrupted_after_first_block(lambda: compress(job(tiny_llama, tmp_path / "resumed")))
    resumed = run_torchrun(2, compress_args(tiny_llama, tmp_path / "resumed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert read(tmp_path / "resumed")["files"] == read(reference)["files"]


@pytest.mark.parametrize("where", ["decompose", "walk"])
def test_a_failure_on_one_rank_stops_every_rank(tiny_llama, tmp_path, where):
    out = tmp_path / "out"
    message = f"planted failure in {where}"
    ranks = run_ranks(2, PLANTED, [where, message, *compress_args(tiny_llama, out)])
    assert [rank.returncode for rank in ranks] == [2, 2], [rank.stderr for rank in ranks]
    error_lines = [line for rank in ranks for line in (rank.stdout + rank.stderr).splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: rank 1 of 2 failed, so every rank stopped: "
                           f"{message if where == 'decompose' else 'RuntimeError: ' + message}"]
    if where == "decompose":  # a user's error: that one line and nothing else
        assert "Traceback" not in "".join(rank.stderr for rank in ranks)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_scaling_arithmetic_shares_each_group_like_compress():
    from sslc_export.scaling import cost, group_seconds

    seconds = {"q_proj": 3, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 4, "up_proj": 4, "down_proj": 5}
    shapes = {"q_proj": (8, 8), "k_proj": (4, 8), "v_proj": (4, 8), "o_proj": (8, 8), "gate_proj": (16, 8),
              "up_proj": (16, 8), "down_proj": (8, 16)}
    assert group_seconds(seconds, shapes, 1) == 20
    assert group_seconds(seconds, shapes, 2) == 3 + 2 + 4 + 5  # q alone, k and v on the other rank
    assert group_seconds(seconds, shapes, 8) == group_seconds(seconds, shapes, 2)
    assert cost((2, 3)) == 2 * 9 + 27
