"""`tiedlm data fetch`: download corpora too large to bundle (WikiText-103) into the data cache.

The archive is downloaded from the dataset's canonical address with a tqdm
progress bar into ``CACHE/NAME.zip.part``; a broken download resumes from
where it stopped (an HTTP Range request), with a few retries when the
connection drops. The finished archive must match its SHA-256; a mismatch
deletes it and says so. The three splits are then unpacked into
``CACHE/NAME/{train,valid,test}.txt`` (atomically: a folder that exists is
complete), with their own SHA256SUMS, and ``data.corpus = "NAME"`` finds them.

CACHE is ``$TIEDLM_DATA``, else ``$XDG_CACHE_HOME/tiedlm``, else ``~/.cache/tiedlm``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tiedlm.errors import TiedlmError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where a corpus comes from and what its archive holds."""

    url: str
    sha256: str
    members: dict[str, str]  # split name → path inside the zip archive
    license: str


SOURCES = {
    # Merity et al. (2016), "Pointer Sentinel Mixture Models": the address the authors published.
    # The SHA-256 is the one public dataset registries (e.g. Julia's DataDeps registration)
    # record for this file; we could not download it from our build machine to check it.
    "wikitext-103": Source(
        url="https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
        sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        members={
            "train": "wikitext-103/wiki.train.tokens",
            "valid": "wikitext-103/wiki.valid.tokens",
            "test": "wikitext-103/wiki.test.tokens",
        },
        license="CC BY-SA 3.0 (text from Wikipedia)",
    ),
}


def cache_dir() -> Path:
    if os.environ.get("TIEDLM_DATA"):
        return Path(os.environ["TIEDLM_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tiedlm"


def cached_corpus(name: str) -> Path | None:
    """The unpacked folder of a fetched corpus, or None if it has not been fetched."""
    folder = cache_dir() / name
    return folder if (folder / "SHA256SUMS").is_file() else None


def verify_cached(folder: Path) -> None:
    """Check the unpacked splits against the SHA256SUMS written when they were fetched."""
    for line in (folder / "SHA256SUMS").read_text(encoding="ascii").splitlines():
        digest, name = line.split()
        path = folder / name
        if not path.is_file():
            raise TiedlmError(f"{path}: missing; delete {folder} and run tiedlm data fetch {folder.name} again")
        if sha256_file(path) != digest:
            raise TiedlmError(
                f"{path}: SHA-256 does not match {folder / 'SHA256SUMS'}; "
                f"delete {folder} and run tiedlm data fetch {folder.name} again"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, part: Path, retries: int, timeout: float, progress: bool) -> None:
    """Download ``url`` into ``part``, continuing a partial file; retry when the connection drops."""
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "tiedlm", "Range": f"bytes={have}-"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status == 200 and have:  # the server ignored the range: start over
                    have = 0
                    part.unlink()
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=part.name.removesuffix(".part"), disable=not progress or None, leave=False,
                ) as bar:  # fmt: skip
                    while block := response.read(CHUNK):
                        out.write(block)
                        bar.update(len(block))
                if total is not None and part.stat().st_size < total:
                    raise http.client.IncompleteRead(b"", total - part.stat().st_size)
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # nothing left to send: the file is complete
                return
            raise TiedlmError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (http.client.HTTPException, OSError) as exc:  # URLError, timeouts, resets are OSErrors
            attempt += 1
            if attempt > retries:
                reason = getattr(exc, "reason", exc)
                raise TiedlmError(
                    f"{url}: download failed after {retries} retries ({reason}); "
                    f"run the command again to resume from {part.stat().st_size if part.exists() else 0} bytes"
                ) from None
            time.sleep(min(2.0**attempt, 30.0) * 0.05)


def fetch(
    name: str,
    *,
    url: str | None = None,
    sha256: str | None = None,
    cache: Path | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    say=print,
) -> Path:
    """Download, verify and unpack corpus ``name``; returns its folder (already there: nothing to do)."""
    if name not in SOURCES:
        raise TiedlmError(f"data fetch: unknown corpus {name!r} (known: {', '.join(SOURCES)})")
    source = SOURCES[name]
    url, expected = url or source.url, (sha256 or source.sha256).lower()
    cache = Path(cache) if cache is not None else cache_dir()
    folder = cache / name
    if (folder / "SHA256SUMS").is_file():
        say(f"{name}: already in {folder}")
        return folder
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TiedlmError(f"{cache}: cannot create the data cache ({exc.strerror})") from None
    archive = cache / f"{name}.zip"
    part = cache / f"{name}.zip.part"
    if not archive.exists():
        if part.exists():
            say(f"{name}: resuming the download at {part.stat().st_size:,} bytes")
        _download(url, part, retries, timeout, progress)
        actual = sha256_file(part)
        if actual != expected:
            part.unlink()
            raise TiedlmError(
                f"{url}: SHA-256 {actual} does not match the expected {expected}; "
                "the download was deleted, run the command again"
            )
        os.replace(part, archive)
    elif sha256_file(archive) != expected:
        archive.unlink()
        raise TiedlmError(f"{archive}: SHA-256 mismatch; the archive was deleted, run the command again")
    if folder.exists():
        raise TiedlmError(f"{folder}: exists but is not a complete download (no SHA256SUMS); remove it and run again")
    _unpack(archive, source.members, folder)
    archive.unlink()
    say(f"{name}: unpacked into {folder}")
    return folder


def _unpack(archive: Path, members: dict[str, str], folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sums = []
        with zipfile.ZipFile(archive) as bundle:
            names = set(bundle.namelist())
            for split, member in members.items():
                if member not in names:
                    raise TiedlmError(f"{archive}: has no {member}")
                with bundle.open(member) as source, open(tmp / f"{split}.txt", "wb") as target:
                    shutil.copyfileobj(source, target, CHUNK)
                sums.append(f"{sha256_file(tmp / f'{split}.txt')}  {split}.txt\n")
        (tmp / "SHA256SUMS").write_text("".join(sums), encoding="ascii")  # written last: marks a complete folder
        os.replace(tmp, folder)
    except zipfile.BadZipFile:
        raise TiedlmError(f"{archive}: not a valid zip archive") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
