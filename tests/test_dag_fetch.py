"""The demo download against a local HTTP server serving a zip built here (never the internet)."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.dag.fetch import FetchError, fetch_demo

TOP = "mimic-iii-clinical-database-demo-1.4"
TABLES = {
    "ICUSTAYS.csv": b"row_id,subject_id,hadm_id,icustay_id\n1,10006,142345,206504\n",
    "ADMISSIONS.csv": b"row_id,subject_id,hadm_id\n1,10006,142345\n",
}


def build_zip(
    tables: dict[str, bytes] = TABLES,
    sums_for: dict[str, bytes] | None = None,
    with_sums: bool = True,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    sums_for = tables if sums_for is None else sums_for
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in tables.items():
            zf.writestr(f"{TOP}/{name}", data)
        if with_sums:
            lines = "".join(
                f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(sums_for.items())
            )
            zf.writestr(f"{TOP}/SHA256SUMS.txt", lines)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append(self.path)
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, path: str, body: bytes) -> str:
        self.routes[path] = body
        return self.base + path


@pytest.fixture()
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_download_verifies_and_extracts_flat(server: Server, tmp_path: Path) -> None:
    body = build_zip()
    url = server.serve("/demo.zip", body)
    dest = tmp_path / "raw" / "mimic"
    result = fetch_demo(dest, url=url, expected_sha256=hashlib.sha256(body).hexdigest())
    assert result.downloaded and result.files == 3
    assert result.zip_sha256 == hashlib.sha256(body).hexdigest()
    for name, data in TABLES.items():
        assert (dest / name).read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == ["mimic"]  # no temp zip, no staging


def test_existing_tables_are_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    url = server.serve("/demo.zip", build_zip())
    dest = tmp_path / "mimic"
    fetch_demo(dest, url=url)
    result = fetch_demo(dest, url=url)
    assert not result.downloaded and "already holds" in result.reason
    assert server.requests == ["/demo.zip"]


def test_wrong_zip_checksum_leaves_no_data(server: Server, tmp_path: Path) -> None:
    url = server.serve("/demo.zip", build_zip())
    dest = tmp_path / "mimic"
    with pytest.raises(FetchError, match="checksum mismatch for http"):
        fetch_demo(dest, url=url, expected_sha256="0" * 64)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_file_not_matching_sha256sums_is_refused(server: Server, tmp_path: Path) -> None:
    tampered = dict(TABLES, **{"ICUSTAYS.csv": b"row_id\n999\n"})
    url = server.serve("/demo.zip", build_zip(tables=tampered, sums_for=TABLES))
    dest = tmp_path / "mimic"
    dest.mkdir()
    with pytest.raises(FetchError, match="checksum mismatch for ICUSTAYS.csv"):
        fetch_demo(dest, url=url)
    assert dest.is_dir() and list(dest.iterdir()) == []  # the empty folder is left as it was


def test_unverifiable_and_unsafe_zips_are_refused(server: Server, tmp_path: Path) -> None:
    url = server.serve("/nosums.zip", build_zip(with_sums=False))
    with pytest.raises(FetchError, match="refusing unverified data"):
        fetch_demo(tmp_path / "a", url=url)
    url = server.serve("/slip.zip", build_zip(extra={"../evil.txt": b"x"}))
    with pytest.raises(FetchError, match="unsafe path"):
        fetch_demo(tmp_path / "b", url=url)
    assert not (tmp_path / "evil.txt").exists()


def test_http_error_and_non_empty_folder(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_demo(tmp_path / "a", url=server.base + "/missing.zip")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FetchError, match="not empty but holds no ICUSTAYS"):
        fetch_demo(busy, url=server.serve("/demo.zip", build_zip()))
    assert (busy / "notes.txt").read_text() == "mine"
