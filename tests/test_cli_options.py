"""The command line's contract: every --help shows each option's text whole (no formula eaten as markup),
defaults come from sslc_export/defaults.py, and out of memory is one line recognised by its type."""
import pytest
import torch
import typer
from typer.testing import CliRunner

from sslc_export.cli import app, handles_user_errors
from sslc_export import defaults

COMMANDS = typer.main.get_command(app).commands


def squeezed(text: str) -> str:
    """Without whitespace: the help wraps lines, also after a hyphen."""
    return "".join(text.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_every_option_text(name):
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    shown = squeezed(result.output)
    for param in COMMANDS[name].params:
        help_text = getattr(param, "help", None)
        if help_text:
            assert squeezed(help_text) in shown, f"{name} {param.name}: {help_text!r} not shown whole"


def test_formulas_survive():
    """The strings rich markup used to swallow."""
    runner = CliRunner()
    assert squeezed("Concat[x, x·Vᵀ] @ [Sᵀ; Uᵀ]") in squeezed(runner.invoke(app, ["export", "--help"]).output)
    assert "cuda[:N]" in runner.invoke(app, ["compress", "--help"]).output


def test_defaults_come_from_one_module():
    compress = {param.name: param.default for param in COMMANDS["compress"].params}
    assert (compress["rank_ratio"], compress["nsamples"], compress["seqlen"], compress["group_size"]) == (
        defaults.RANK_RATIO, defaults.NSAMPLES, defaults.SEQLEN, defaults.GROUP_SIZE)
    assert {param.name: param.default for param in COMMANDS["eval"].params}["window"] == defaults.WINDOW


def test_defaults_match_the_dataclasses():
    from sslc_export.compress import CompressJob
    from sslc_export.methods import Settings

    job, settings = CompressJob(out=None), Settings()
    assert (settings.rank_ratio, settings.group_size, job.nsamples, job.seqlen) == (
        defaults.RANK_RATIO, defaults.GROUP_SIZE, defaults.NSAMPLES, defaults.SEQLEN)


@pytest.mark.parametrize("flags, expected", [
    ([], {"loss": "exact", "rank_ratio": defaults.RANK_RATIO, "iters": 2}),
    (["--preset", "paper"], {"loss": "diag", "first_step": "svd", "rank_ratio": 0.25, "iters": 2}),
    (["--preset", "paper", "--rank-ratio", "0.3", "--loss", "exact"], {"loss": "exact", "first_step": "svd", "rank_ratio": 0.3}),
])
def test_preset_fills_the_settings_not_given(tiny_llama, tmp_path, flags, expected):
    """--iters 2 keeps the runs short and shows that a flag given wins over the preset's 40. Without a preset the
    fingerprint has no first_step, so checkpoints made before the option still match."""
    import json

    result = CliRunner().invoke(app, ["compress", "--model", str(tiny_llama), "--out", str(tmp_path / "ckpt"), "--iters", "2",
                                      "--nsamples", "2", "--seqlen", "16", *flags, "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert {key: manifest["settings"][key] for key in expected} == expected
    assert ("first_step" in manifest["fingerprint"]["settings"]) == ("--preset" in flags)


@pytest.mark.parametrize("error, exit_code", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), 3),
    (MemoryError(), 3),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000000 bytes"), 3),
])
def test_out_of_memory_is_one_line(error, exit_code, capsys):
    def command():
        raise error

    with pytest.raises(typer.Exit) as exit_info:
        handles_user_errors(command)()
    assert exit_info.value.exit_code == exit_code
    assert "out of memory" in capsys.readouterr().err


def test_a_message_about_memory_is_not_taken_for_out_of_memory():
    """Only the type (or torch's CPU allocator) counts: a crash that mentions memory keeps its traceback."""
    def command():
        raise RuntimeError("could not allocate memory for the cache")

    with pytest.raises(RuntimeError):
        handles_user_errors(command)()
