"""Where the ETL may write: it replaces only a folder that it wrote itself.

The output folder is swapped in as a whole (``features.atomic.atomic_dir``), so whatever was
at ``--out`` before is removed. That is only safe for a previous ETL output (its data card, and
nothing in it but what the ETL writes: a stray file of the user's is not ours to delete).
"""

from __future__ import annotations

import json
from pathlib import Path

from features.atomic import paths_overlap
from features.errors import UserError

PRODUCER = "icu-forecast etl"
OUTPUT_ENTRIES = frozenset({"bins.parquet", "data_card.json"})
# Written by earlier versions (the preprocessor is now fitted by training, per fold).
LEGACY_ENTRIES = frozenset({"preprocessor"})


def _card_is_ours(card_path: Path) -> bool:
    # Cards from before the "producer" field: format 1 with catalog_version and bins_sha256.
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(card, dict) and (
        card.get("producer") == PRODUCER
        or (card.get("format") == 1 and "catalog_version" in card and "bins_sha256" in card)
    )


def check_out_dir(out: Path, mimic_dir: Path, temp_dir: Path | None) -> None:
    """Raise :class:`UserError` unless replacing ``out`` can only lose ETL output."""
    if paths_overlap(out, mimic_dir):
        raise UserError(
            f"--out {out} overlaps the input folder {mimic_dir} (is it, contains it or lies "
            "inside it); the ETL never writes over its inputs: choose another --out"
        )
    if temp_dir is not None and paths_overlap(temp_dir, mimic_dir):
        raise UserError(
            f"--temp-dir {temp_dir} overlaps the input folder {mimic_dir}; choose another one"
        )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder; refusing to replace it")
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as exc:
        raise UserError(f"--out {out}: cannot list the folder ({exc.strerror})") from exc
    if not entries:
        return
    if "data_card.json" not in entries or not _card_is_ours(out / "data_card.json"):
        raise UserError(
            f"--out {out} is a non-empty folder that is not an earlier ETL output (no "
            f"data_card.json written by {PRODUCER}); refusing to replace it: choose a new or "
            "empty folder"
        )
    foreign = [e for e in entries if e not in OUTPUT_ENTRIES | LEGACY_ENTRIES]
    if foreign:
        raise UserError(
            f"--out {out} is an earlier ETL output but also holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}, which the ETL did not write; refusing to "
            "replace it: move those out first or choose another folder"
        )
