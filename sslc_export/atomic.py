"""Writes that never leave a half-written file or folder looking complete.

Files go to a temporary name in the same folder and are renamed into place; folders are
built under a hidden `.NAME.partial` sibling and renamed when whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sslc_export.errors import UserError


def check_writable_target(path: Path, overwrite: bool) -> None:
    """Fail before any work if the output cannot be created."""
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists: pass --overwrite to replace it or choose another path")
    check_output_path(path)


def check_output_path(path: Path) -> None:
    """Fail before any work if path (a file or folder to create, or to replace) cannot be written:
    its nearest existing ancestor must be a folder in which an entry can really be made. The probe
    creates and removes a hidden folder, so a read-only file system, /proc or a missing permission
    is caught even for root, for whom os.access says yes."""
    parent = path.parent if path.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write to {parent}: {probe} is not a folder; choose an output path in a writable folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".sslc-export-probe-"))
    except OSError as exc:
        raise UserError(f"cannot write to {parent}: nothing can be created in {probe} ({exc.strerror}); "
                        f"choose an output path in a writable folder") from None


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), then rename tmp_path to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_file_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def publish_directory(work: Path, final: Path) -> None:
    """Rename a finished work folder onto its final name, replacing an older one only at the end."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_inventory(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Relative path -> sha256 and size of every file under folder, for a manifest."""
    return {
        str(path.relative_to(folder)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and str(path.relative_to(folder)) not in exclude
    }


def verify_inventory(folder: Path, inventory: dict[str, dict]) -> None:
    """Refuse a folder whose files were changed, truncated or removed since the manifest was written."""
    for name, expected in inventory.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"{folder} is incomplete: {name} is missing; re-create it")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise UserError(f"{folder / name} does not match its manifest hash (corrupt or modified): re-create it")
