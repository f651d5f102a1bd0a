"""What `pip install` puts into site-packages: one name, sslc_export. The repository keeps models/, runtimes/ and
cli.py at its top level; pyproject.toml installs them as sslc_export.models, sslc_export.runtimes and sslc_export.cli,
so no other distribution's `models` or `cli` collides with them. The wheel is built and installed offline
(--no-build-isolation: setuptools comes with torch)."""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"models": "sslc_export/models", "runtimes": "sslc_export/runtimes", "sslc_export": "sslc_export"}
TOP_LEVEL_IMPORT = re.compile(r"^\s*(from|import) (models|runtimes|cli)\b", re.MULTILINE)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (a build in place would write build/ into the checkout)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "src")  # runtimes/kernels/src: C++, not installed
    for folder in MAPPED:
        shutil.copytree(ROOT / folder, source / folder, symlinks=True, ignore=ignore)
    for name in ("cli.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(source)]
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=source)
    (built,) = out.glob("sslc_export-*.whl")
    return built


def test_wheel_installs_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/RECORD"))
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        assert {name.split("/")[0] for name in names} == {"sslc_export", dist_info}
        assert top_level == ["sslc_export"]
        assert dict(entry_points["console_scripts"]) == {"sslc-export": "sslc_export.cli:main"}
        assert archive.read("sslc_export/cli.py") == (ROOT / "cli.py").read_bytes()
    # every module of the three folders is in the wheel, under its installed name (pyproject lists the packages)
    for folder, installed in MAPPED.items():
        for module in (ROOT / folder).rglob("*.py"):
            if not module.is_symlink():
                assert f"{installed}/{module.relative_to(ROOT / folder).as_posix()}" in names, module


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("SSLC_KERNELS_LIBRARY", None)
    probe = ("import sslc_export.cli as cli, sslc_export.models.loading as loading\n"
             "from sslc_export.runtimes import bench, kernels\n"
             "print(loading.__file__, bench.__file__, cli.__file__)\n"
             "print(kernels.availability())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files, availability = result.stdout.splitlines()
    assert all(Path(file).is_relative_to(site / "sslc_export") for file in files.split())
    # no sources or Makefile beside a wheel: one line says where the kernel library comes from
    assert "False" in availability and "SSLC_KERNELS_LIBRARY" in availability and "checkout" in availability
    result = subprocess.run([str(site / "bin" / "sslc-export"), "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0 and "compress" in result.stdout, result.stderr


def test_checkout_without_install_finds_the_mapped_folders():
    """`make gpu-check` may run a checkout that was never installed (no registry to build .venv): -S, no
    site-packages, so no editable install either."""
    probe = ("import importlib.util, sslc_export.models as models, sslc_export.runtimes as runtimes\n"
             "print(models.__file__, runtimes.__file__, importlib.util.find_spec('sslc_export.cli').origin)")
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    models, runtimes, cli = map(Path, result.stdout.split())
    assert (models, runtimes, cli.resolve()) == (ROOT / "models" / "__init__.py", ROOT / "runtimes" / "__init__.py",
                                                 ROOT / "cli.py")


def test_code_imports_the_installed_names():
    """`from models...` works in a checkout only, and beside `sslc_export.models` it loads every module twice."""
    sources = [ROOT / "cli.py", *(path for folder in (*MAPPED, "tests") for path in (ROOT / folder).rglob("*.py"))]
    offenders = [f"{path.relative_to(ROOT)}: {match.group(0).strip()}" for path in sources if not path.is_symlink()
                 for match in TOP_LEVEL_IMPORT.finditer(path.read_text())]
    assert not offenders, "import sslc_export.models, sslc_export.runtimes, sslc_export.cli:\n" + "\n".join(offenders)
