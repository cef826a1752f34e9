"""The cross-validation report's Markdown: sections replaced in place, the rest kept."""

from __future__ import annotations

from pathlib import Path

from training.cv import parse_variant, replace_section


def test_replace_section_keeps_other_sections(tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    replace_section(path, "Main", "first")
    path.write_text(path.read_text() + "\n## Reading\n\nhand-written notes\n")
    replace_section(path, "Case study", "table one")
    replace_section(path, "Main", "second\n\nwith two paragraphs")
    text = path.read_text()
    assert text.startswith("# Results\n")
    assert "first" not in text and "second\n\nwith two paragraphs" in text
    assert "hand-written notes" in text and "table one" in text
    assert text.index("## Main") < text.index("## Reading") < text.index("## Case study")
    assert text.count("## Main") == 1


def test_variants_by_name_or_spec() -> None:
    assert parse_variant("gru") == ("gru", {"model": "gru"})
    label, over = parse_variant("tiny=cfc-small:units=8,lr=0.01")
    assert label == "tiny"
    assert over["model"] == "cfc" and over["units"] == "8" and over["backbone_units"] == 32
    label, over = parse_variant("g=gru:units=32")
    assert (label, over) == ("g", {"model": "gru", "units": "32"})
