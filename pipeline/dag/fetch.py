"""Download the open MIMIC-III Clinical Database Demo (v1.4) from PhysioNet, verified.

The demo is open data (ODbL), so users without credentialed access can run the whole
pipeline. The download is verified twice: against ``expected_sha256`` of the zip when one is
given, and always file by file against the ``SHA256SUMS.txt`` that PhysioNet ships inside
every project archive (a zip without it is refused unless the zip's own digest was checked).
Extraction goes to a staging folder that replaces the data folder in one rename, so an
interrupted download never leaves a half-filled data folder behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from features import leftovers
from features.atomic import atomic_dir
from features.checksum import sha256_file
from features.errors import UserError

log = logging.getLogger(__name__)

DEMO_URL = (
    "https://physionet.org/static/published-projects/mimiciii-demo/"
    "mimic-iii-clinical-database-demo-1.4.zip"
)
SUMS_NAME = "SHA256SUMS.txt"
_CHUNK = 1 << 20


class FetchError(UserError):
    """The download failed or did not verify; the data folder was left untouched."""


@dataclass(frozen=True)
class FetchResult:
    dest: Path
    downloaded: bool
    files: int = 0
    zip_sha256: str | None = None
    reason: str = ""


def has_mimic_tables(folder: Path) -> bool:
    """True when ``folder`` holds the ICUSTAYS table (either case, .csv or .csv.gz)."""
    wanted = {"icustays.csv", "icustays.csv.gz"}
    return folder.is_dir() and any(p.name.lower() in wanted for p in folder.iterdir())


def _download(url: str, target: Path, timeout_s: float) -> str:
    """Stream ``url`` into ``target``; return the SHA-256 of what was written."""
    try:
        with (
            httpx.stream("GET", url, follow_redirects=True, timeout=timeout_s) as response,
            target.open("wb") as fh,
        ):
            if response.status_code != 200:
                raise FetchError(f"download of {url} failed: HTTP {response.status_code}")
            for chunk in response.iter_bytes(_CHUNK):
                fh.write(chunk)
    except httpx.HTTPError as exc:
        raise FetchError(f"download of {url} failed: {exc}") from exc
    return sha256_file(target)


def _parse_sums(text: str, source: str) -> dict[str, str]:
    sums: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise FetchError(f"{source} line {lineno} is not '<sha256>  <file>': {line!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def _members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The file members by path below the archive's single top folder (if it has one),
    traversal-checked."""
    files = {PurePosixPath(m.filename): m for m in archive.infolist() if not m.is_dir()}
    if not files:
        raise FetchError("the downloaded zip is empty")
    for p, m in files.items():
        if p.is_absolute() or ".." in p.parts:
            raise FetchError(f"the downloaded zip holds an unsafe path: {m.filename!r}")
    nested = len({p.parts[0] for p in files}) == 1 and all(len(p.parts) > 1 for p in files)
    return {str(p.relative_to(p.parts[0]) if nested else p): m for p, m in files.items()}


def fetch_demo(
    dest: Path,
    url: str = DEMO_URL,
    expected_sha256: str | None = None,
    timeout_s: float = 120.0,
) -> FetchResult:
    """Fill the empty folder ``dest`` with the demo tables from ``url``.

    A folder that already holds MIMIC tables is left alone (the user's own copy, or an earlier
    download); a non-empty folder without them is an error rather than something to overwrite.
    """
    dest = Path(dest)
    if has_mimic_tables(dest):
        return FetchResult(dest, downloaded=False, reason=f"{dest} already holds MIMIC tables")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise FetchError(
            f"data folder {dest} is not empty but holds no ICUSTAYS table; "
            "point --mimic-dir at a MIMIC-III folder or at an empty folder to download into"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.download-"
    leftovers.remove_stale(dest.parent, prefix)  # the zip of a download that was killed
    with tempfile.NamedTemporaryFile(
        prefix=prefix + leftovers.owner_mark(), suffix=".zip", dir=dest.parent
    ) as tmp:
        tmp_zip = Path(tmp.name)
        log.info("downloading %s", url)
        zip_sha = _download(url, tmp_zip, timeout_s)
        if expected_sha256 and zip_sha != expected_sha256.lower():
            raise FetchError(
                f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {zip_sha}"
            )
        try:
            archive = zipfile.ZipFile(tmp_zip)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{url} did not return a zip archive: {exc}") from exc
        with archive:
            by_rel = _members(archive)
            if SUMS_NAME in by_rel:
                sums = _parse_sums(archive.read(by_rel[SUMS_NAME]).decode(), SUMS_NAME)
            elif expected_sha256:
                sums = {}
            else:
                raise FetchError(
                    f"{url} holds no {SUMS_NAME} and no expected sha256 was given: "
                    "refusing unverified data"
                )
            missing = sorted(set(sums) - set(by_rel))
            if missing:
                raise FetchError(f"files listed in {SUMS_NAME} are missing from the zip: {missing}")
            if not any(r.lower().startswith("icustays.csv") for r in by_rel):
                raise FetchError(f"{url} holds no ICUSTAYS table; is it the MIMIC-III demo?")
            with atomic_dir(dest) as staging:
                for rel, member in by_rel.items():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    if rel in sums and (got := sha256_file(target)) != sums[rel]:
                        raise FetchError(
                            f"checksum mismatch for {rel} in {url}: expected {sums[rel]}, got {got}"
                        )
        log.info("extracted %d files into %s (zip sha256 %s)", len(by_rel), dest, zip_sha)
        return FetchResult(dest, downloaded=True, files=len(by_rel), zip_sha256=zip_sha)
