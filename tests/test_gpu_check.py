"""make gpu-check without a GPU: one line and exit 1; its comparison logic, run on the CPU (plain twice, then under
torchrun with one process) with the tiny model."""
import pytest
import torch
import typer

from sslc_export.runtimes.gpu_check import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_is_one_line(tmp_path, capsys):
    with pytest.raises(typer.Exit) as exit_info:
        main(work_dir=tmp_path, tiny=True, device="cuda")
    assert exit_info.value.exit_code == 1
    printed = capsys.readouterr().out
    assert printed.startswith("gpu-check: no CUDA: ") and printed.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cpu_against_cpu_agrees(tmp_path, capsys):
    main(work_dir=tmp_path, tiny=True, device="cpu")
    printed = capsys.readouterr().out
    assert printed.count("compress on cpu: ") == 2
    assert any(line.startswith("onnx ") for line in printed.splitlines())  # skipped, or both providers measured
    assert "cpu vs cpu: " in printed and printed.count(": agree") == 1
    torchrun = [line for line in printed.splitlines() if line.startswith("torchrun, 1 process (gloo) on cpu: ")]
    assert len(torchrun) == 1 and torchrun[0].endswith("agree")
    assert printed.splitlines()[-1].startswith("gpu-check: all agree; ")
