"""Provider adapters: CPU runs; an unavailable provider is a clear error, never a CPU fall-back."""
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.runtimes.providers import PROVIDERS, get_provider
from sslc_export.errors import UserError


def test_cpu_is_available():
    assert get_provider("cpu").availability().available


@pytest.mark.parametrize("name", [n for n in PROVIDERS if n != "cpu"])
def test_unavailable_provider_is_an_error_with_its_reason(name, tmp_path):
    provider = get_provider(name)
    state = provider.availability()
    if state.available:
        pytest.skip(f"{name} is available on this machine")
    print(f"{name} skipped here: {state.reason}")  # CI has no GPU: say why
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match=f"provider {name} is not available"):
        provider.open_session(tmp_path / "model.onnx")


def test_unknown_provider():
    with pytest.raises(UserError, match="unknown provider 'tpu'"):
        get_provider("tpu")


def test_providers_command_lists_all():
    result = CliRunner().invoke(app, ["providers"])
    assert result.exit_code == 0
    for name in PROVIDERS:
        assert name in result.output
