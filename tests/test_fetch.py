"""`tiedlm data fetch` against a local HTTP server: download, resume, checksum, unpack."""

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tiedlm.cli import main
from tiedlm.data import load_corpus
from tiedlm.errors import TiedlmError
from tiedlm.fetch import fetch

TEXT = {
    "train": " = Title = \n the cat sat on the mat \n the dog sat \n" * 50,
    "valid": " the cat sat \n",
    "test": " the dog sat on the mat \n",
}


def make_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for split, text in TEXT.items():
            bundle.writestr(f"wikitext-103/wiki.{split}.tokens", text)
        bundle.writestr("wikitext-103/README", "not unpacked")
    return buffer.getvalue()


ARCHIVE = make_archive()
DIGEST = hashlib.sha256(ARCHIVE).hexdigest()


class Server:
    """Serves /good.zip, /corrupt.zip, /drop.zip (the first response stops halfway), /norange.zip."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []
        self.dropped = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = ARCHIVE
                if self.path == "/corrupt.zip":
                    body = ARCHIVE[:-10] + b"0123456789"
                elif self.path not in ("/good.zip", "/drop.zip", "/norange.zip"):
                    self.send_error(404)
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and self.path != "/norange.zip":
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body) and start:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if self.path == "/drop.zip" and not server.dropped:
                    server.dropped = True
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def quiet(*args, **kwargs):
    pass


def test_fetch_verifies_unpacks_and_the_corpus_loads(server, tmp_path, monkeypatch):
    folder = fetch("wikitext-103", url=f"{server.url}/good.zip", sha256=DIGEST, cache=tmp_path, progress=False,
                   say=quiet)  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "test.txt", "train.txt", "valid.txt"]
    assert (folder / "valid.txt").read_text() == TEXT["valid"]
    assert not list(tmp_path.glob("*.zip*"))  # the archive is removed after unpacking
    monkeypatch.setenv("TIEDLM_DATA", str(tmp_path))
    corpus = load_corpus("wikitext-103")
    assert corpus.name == "wikitext-103" and "mat" in corpus.vocab.stoi
    # Fetching again does nothing.
    requests = len(server.requests)
    fetch("wikitext-103", url=f"{server.url}/good.zip", sha256=DIGEST, cache=tmp_path, progress=False, say=quiet)
    assert len(server.requests) == requests
    # A damaged unpacked file is caught when the corpus is loaded.
    (folder / "test.txt").write_text("tampered\n")
    with pytest.raises(TiedlmError, match="test.txt: SHA-256 does not match"):
        load_corpus("wikitext-103")


def test_corrupted_download_is_rejected_and_deleted(server, tmp_path):
    with pytest.raises(TiedlmError, match="does not match the expected"):
        fetch("wikitext-103", url=f"{server.url}/corrupt.zip", sha256=DIGEST, cache=tmp_path, progress=False,
              say=quiet)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    fetch("wikitext-103", url=f"{server.url}/drop.zip", sha256=DIGEST, cache=tmp_path, progress=False, say=quiet)
    assert (tmp_path / "wikitext-103" / "train.txt").read_text() == TEXT["train"]
    ranges = [r for path, r in server.requests if path == "/drop.zip"]
    assert ranges[0] == "bytes=0-" and ranges[1] == f"bytes={len(ARCHIVE) // 2}-"


def test_a_broken_download_continues_on_the_next_run(server, tmp_path, capsys):
    with pytest.raises(TiedlmError, match="run the command again to resume"):
        fetch("wikitext-103", url=f"{server.url}/drop.zip", sha256=DIGEST, cache=tmp_path, retries=0,
              progress=False, say=quiet)  # fmt: skip
    part = tmp_path / "wikitext-103.zip.part"
    assert part.stat().st_size == len(ARCHIVE) // 2
    fetch("wikitext-103", url=f"{server.url}/drop.zip", sha256=DIGEST, cache=tmp_path, retries=0, progress=False,
          say=print)  # fmt: skip
    assert "resuming the download at" in capsys.readouterr().out
    assert (tmp_path / "wikitext-103" / "SHA256SUMS").is_file()


def test_a_server_without_ranges_restarts_the_download(server, tmp_path):
    (tmp_path / "wikitext-103.zip.part").write_bytes(b"stale bytes")
    fetch("wikitext-103", url=f"{server.url}/norange.zip", sha256=DIGEST, cache=tmp_path, progress=False,
          say=quiet)  # fmt: skip
    assert (tmp_path / "wikitext-103" / "valid.txt").read_text() == TEXT["valid"]


def test_command_line(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIEDLM_DATA", str(tmp_path / "cache"))
    from conftest import write_config

    config = write_config(tmp_path / "c.toml", tmp_path)
    config.write_text(config.read_text().replace(f'corpus = "{tmp_path}"', 'corpus = "wikitext-103"'))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "not downloaded yet: run tiedlm data fetch wikitext-103" in capsys.readouterr().err
    assert main(["data", "fetch", "wikitext-103", "--url", f"{server.url}/good.zip", "--sha256", DIGEST]) == 0
    assert (tmp_path / "cache" / "wikitext-103" / "train.txt").is_file()
    assert main(["data", "fetch", "wikitext-99"]) == 2
    assert "unknown corpus 'wikitext-99'" in capsys.readouterr().err
    assert main(["data", "fetch", "wikitext-103", "--sha256", "abc"]) == 2
    assert main(["data", "fetch", "wikitext-103", "--url", f"{server.url}/missing.zip", "--sha256", DIGEST,
                 "--cache", str(tmp_path / "other")]) == 2  # fmt: skip
    assert "HTTP 404" in capsys.readouterr().err
