"""The bundled texts, one per domain for calibration and one per domain held out, and the user's
choice among them (`--calib`, `--heldout`): a quality figure from one domain hides how a method
fits its calibration text, so evaluation covers every domain and calibration mixes them.
Provenance and licences: data/SOURCES.md."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sslc_export.errors import UserError

DATA_DIR = Path(__file__).parent / "data"
# Same domains on both sides, never the same text: held-out figures measure what calibration did not see.
CALIBRATION_TEXTS = {
    "prose": DATA_DIR / "calibration.txt",  # Pride and Prejudice ch. II-XXX
    "technical": DATA_DIR / "calibration-technical.txt",  # Python tutorial (classes, control flow, errors)
    "code": DATA_DIR / "calibration-code.txt",  # CPython stdlib: configparser, csv, json
}
HELDOUT_TEXTS = {
    "prose": DATA_DIR / "heldout.txt",  # Alice's Adventures in Wonderland
    "technical": DATA_DIR / "heldout-technical.txt",  # SQLite docs: atomic commit, isolation
    "code": DATA_DIR / "heldout-code.txt",  # CPython stdlib: textwrap, shlex, fractions
}
CALIBRATION_MIX = "mix"
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class NamedText:
    """A text and the short name tables and manifests show for it (its domain, or its file's stem)."""

    name: str
    path: Path


def _choose(choice: str, bundled: dict[str, Path], option: str) -> list[NamedText]:
    """Comma-separated bundled names or paths (a file or a folder of .txt files)."""
    chosen = []
    for item in (part.strip() for part in choice.split(",")):
        if item in bundled:
            chosen.append(NamedText(item, bundled[item]))
        elif item and Path(item).exists():
            chosen.append(NamedText(Path(item).stem, Path(item)))
        else:
            raise UserError(f"{option} '{item}' does not exist as a file or folder and is not a bundled text ({', '.join(bundled)})")
    names = [text.name for text in chosen]
    if len(set(names)) != len(names):
        raise UserError(f"{option} names a text twice (or two files with the same stem): {', '.join(names)}")
    return chosen


def read_text(path: Path) -> str:
    """One file, or every .txt/.md file of a folder in name order; must be non-empty UTF-8 text."""
    if not path.exists():
        raise UserError(f"text path {path} does not exist: pass a UTF-8 text file or a folder of .txt files")
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise UserError(f"folder {path} holds no .txt or .md files")
    parts = []
    for file in files:
        raw = file.read_bytes()
        if b"\x00" in raw:
            raise UserError(f"{file} looks binary (it contains NUL bytes): pass a UTF-8 text file")
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise UserError(f"{path} is empty: pass a text with at least one calibration sequence")
    return text


def heldout_texts(choice: str | None) -> list[NamedText]:
    """None: every bundled held-out text, prose (Alice) first."""
    return _choose(choice, HELDOUT_TEXTS, "--heldout") if choice else [NamedText(n, p) for n, p in HELDOUT_TEXTS.items()]


def calibration_texts(choice: str | None) -> list[NamedText]:
    """None or 'mix': every bundled calibration text, sampled in equal shares."""
    if choice is None or choice == CALIBRATION_MIX:
        return [NamedText(name, path) for name, path in CALIBRATION_TEXTS.items()]
    return _choose(choice, CALIBRATION_TEXTS, "--calib")


def read_heldout(choice: str | None) -> dict[str, str]:
    """Name -> content of the chosen held-out texts, in the order given."""
    return {text.name: read_text(text.path) for text in heldout_texts(choice)}
