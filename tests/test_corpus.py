"""The bundled texts (licensed, calibration disjoint from held-out), the calibration mix, and
perplexity reported per held-out text by eval and compare."""
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from sslc_export.cli import app
from sslc_export.models.loading import load_model
from sslc_export.calibration import CalibrationSet, token_batches
from sslc_export.corpus import CALIBRATION_TEXTS, DATA_DIR, HELDOUT_TEXTS, calibration_texts, heldout_texts
from sslc_export.evaluate import perplexity

PASSAGE = 200  # characters: longer than any boilerplate line two unrelated texts could share


def test_every_bundled_text_has_a_source_and_licence_row():
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `([^`]+)` \|(.*)\|$", (DATA_DIR / "SOURCES.md").read_text(), re.M)
    }
    bundled = {path.name for path in DATA_DIR.glob("*.txt")}
    assert bundled == {path.name for path in [*CALIBRATION_TEXTS.values(), *HELDOUT_TEXTS.values()]}
    for name in bundled:
        cells = [cell.strip() for cell in rows[name].split("|")]
        assert len(cells) == 4 and all(cells), f"{name}: role, source, licence and extraction must all be stated"
        assert "public domain" in cells[2] or "License" in cells[2], cells[2]


def test_calibration_never_contains_a_heldout_passage():
    calibration = "\n".join(path.read_text() for path in CALIBRATION_TEXTS.values())
    for name, path in HELDOUT_TEXTS.items():
        text = path.read_text()
        shared = [start for start in range(0, len(text) - PASSAGE, PASSAGE // 4) if text[start : start + PASSAGE] in calibration]
        assert not shared, f"held-out {name} shares passages with calibration at offsets {shared[:3]}"


def test_default_calibration_mixes_every_domain_and_heldout_covers_them():
    assert [text.name for text in calibration_texts(None)] == ["prose", "technical", "code"]
    assert [text.name for text in heldout_texts(None)] == ["prose", "technical", "code"]
    assert heldout_texts(None)[0].path.name == "heldout.txt"  # Alice stays the first, today's figure
    assert [text.name for text in calibration_texts("prose")] == ["prose"]


def test_mix_takes_equal_shares_and_one_text_samples_as_before(tiny_llama):
    tokenizer = load_model(str(tiny_llama)).tokenizer
    mix = CalibrationSet.read(None)
    assert mix.shares(8) == [3, 3, 2] and sum(record["sequences"] for record in mix.record(8)) == 8
    tokens = mix.tokens(tokenizer, 8, 32, seed=0)
    for rows, content in ((tokens[:3], mix.contents[0]), (tokens[3:6], mix.contents[1]), (tokens[6:], mix.contents[2])):
        ids = tokenizer(content, return_tensors="pt", add_special_tokens=False).input_ids[0].tolist()
        text_windows = {tuple(ids[start : start + 32]) for start in range(len(ids) - 31)}
        assert all(tuple(row.tolist()) in text_windows for row in rows)  # each share comes from its own text
    prose = CalibrationSet.read("prose")
    expected = token_batches(tokenizer, prose.contents[0], 8, 32, 0)
    assert torch.equal(prose.tokens(tokenizer, 8, 32, seed=0), expected)


@pytest.fixture
def two_texts(tmp_path):
    prose = tmp_path / "story.txt"
    prose.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 12)
    code = tmp_path / "snippet.txt"
    code.write_text("def fortune(man):\n    return {'single': man, 'wife': None}\n\n" * 16)
    return prose, code


def test_eval_reports_each_heldout_text_on_its_own_text(tiny_llama, tmp_path, two_texts):
    evaluation = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--heldout", ",".join(map(str, two_texts)), "--window", "64",
                                      "--max-new-tokens", "0", "--json", str(evaluation)])
    assert result.exit_code == 0, result.output
    reported = json.loads(evaluation.read_text())["heldout"]
    assert list(reported) == ["story", "snippet"]
    loaded = load_model(str(tiny_llama))
    for path in two_texts:
        direct = perplexity(loaded.model, loaded.tokenizer, path.read_text(), window=64)
        assert reported[path.stem]["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
        assert reported[path.stem]["tokens"] == direct["tokens"]
    assert reported["story"]["perplexity"] != pytest.approx(reported["snippet"]["perplexity"], rel=1e-3)
    assert "story" in result.output and "snippet" in result.output


def test_compare_reports_every_text_and_recalibrates_when_the_mix_changes(tiny_llama, tmp_path, two_texts):
    figures, report = tmp_path / "compare.json", tmp_path / "results.md"
    common = ["compare", "--model", str(tiny_llama), "--methods", "magnitude", "--ratios", "0.5", "--extra-losses", "",
              "--heldout", ",".join(map(str, two_texts)), "--window", "64", "--nsamples", "4", "--seqlen", "32",
              "--work-dir", str(tmp_path / "work"), "--json", str(figures)]
    result = CliRunner().invoke(app, [*common, "--report", str(report)])
    assert result.exit_code == 0, result.output
    rows = json.loads(figures.read_text())["rows"]
    assert [list(row["perplexity"]) for row in rows] == [["story", "snippet"]] * 2
    assert set(rows[1]["perplexity_vs_dense"]) == {"story", "snippet"}
    assert "| ppl story | ppl snippet | worst vs dense |" in report.read_text()
    manifest = json.loads((tmp_path / "work" / "magnitude-default-r0.5" / "manifest.json").read_text())
    assert [text["name"] for text in manifest["calibration"]["texts"]] == ["prose", "technical", "code"]
    assert manifest["calibration"]["source"] == "mix"
    # a checkpoint calibrated on the mix is not reused for a prose-only calibration
    result = CliRunner().invoke(app, [*common, "--calib", "prose"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "work" / "magnitude-default-r0.5" / "manifest.json").read_text())
    assert [text["name"] for text in manifest["calibration"]["texts"]] == ["prose"]


def test_compare_never_reuses_another_models_checkpoint(tiny_llama, tmp_path):
    """Same method, ratio, settings and calibration, but a different model (other weights): recompressed.
    The same model again: reused (the checkpoint is left as it was)."""
    from sslc_export.models.synthetic import build_random_model

    other = build_random_model(tmp_path / "other", "llama", seed=7)
    common = ["compare", "--methods", "magnitude", "--ratios", "0.5", "--extra-losses", "", "--heldout", "prose",
              "--window", "64", "--nsamples", "4", "--seqlen", "32", "--work-dir", str(tmp_path / "work")]
    manifest = tmp_path / "work" / "magnitude-default-r0.5" / "manifest.json"
    hashes = []
    for model in (tiny_llama, other, other):
        result = CliRunner().invoke(app, [*common, "--model", str(model)])
        assert result.exit_code == 0, result.output
        record = json.loads(manifest.read_text())
        hashes.append((record["fingerprint"]["model_sha256"], record["created"], manifest.stat().st_mtime_ns))
    assert hashes[0][0] != hashes[1][0]  # the other model's checkpoint replaced the first
    assert hashes[2] == hashes[1]  # and was reused as it stood
