"""Fetching checkpoint files over HTTP: verified, atomic, with a progress bar.

A download is streamed into a temporary file beside its destination and renamed into
place only after its length and sha256 have been checked, so the cache never holds a
partial or corrupt file, and a good file already there survives a failed re-download.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from slimseg.errors import SlimsegError
from slimseg.io import atomic_output

__all__ = ["download_file", "file_sha256", "mirror_url", "offline_requested"]

CHUNK_SIZE = 1 << 20
OFFLINE_ENV = "SLIMSEG_OFFLINE"
BASE_URL_ENV = "SLIMSEG_BASE_URL"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# The Hugging Face hub puts an LFS file's sha256 in X-Linked-Etag (on the resolve
# response, which is usually a redirect to a CDN); a plain ETag is only trusted when it
# happens to be 64 hex digits, which rules out the MD5 ETags of S3 and friends.
_DIGEST_HEADERS = ("X-Linked-Etag", "ETag")


def offline_requested() -> bool:
    """True when the environment asks for no network access (``SLIMSEG_OFFLINE=1``)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE_WORDS


def mirror_url(default_url: str, filename: str) -> str:
    """Where to fetch ``filename`` from: ``$SLIMSEG_BASE_URL/filename`` when that variable
    is set (for mirrors, air-gapped caches and tests), else ``default_url``."""
    base = os.environ.get(BASE_URL_ENV, "").strip()
    if not base:
        return default_url
    parts = urlsplit(base)
    if not parts.scheme or not (parts.netloc or parts.scheme == "file"):
        raise SlimsegError(_one_line(f"{BASE_URL_ENV}={base!r} is not a URL: give one such as http://host/path "
                                     "(or unset it to download from the original sources)"))
    return f"{base.rstrip('/')}/{filename}"


def file_sha256(path: Path, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex sha256 of the file at ``path``, read in chunks so large checkpoints fit in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: Path,
    sha256: str | None,
    *,
    offline: bool = False,
    console: Console | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``destination`` and return ``destination``.

    Args:
        url: what to fetch (http, https, or anything else urllib opens, e.g. file://).
        destination: the final path; its folder is created if needed.
        sha256: expected hex digest; when None, the server must report one (the Hugging
            Face hub's ``X-Linked-Etag``), because an unverified checkpoint is refused.
        offline: refuse to touch the network (also forced by ``SLIMSEG_OFFLINE``).
        console: where the progress bar goes (stderr by default); off a terminal, one plain
            "downloading URL → PATH (SIZE)" line instead.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        SlimsegError: offline, unreachable host, HTTP error, truncated transfer, missing
            or mismatching sha256. Nothing is left at or beside ``destination`` then.
        KeyboardInterrupt: propagated after the temporary file is removed.
    """
    destination = Path(destination)
    if offline or offline_requested():
        raise SlimsegError(_one_line(f"offline: fetch {url} and save it as {destination}"))
    if sha256 is not None and not _SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")

    _remove_stale_temporaries(destination)
    recorder = _RedirectRecorder()
    opener = urllib.request.build_opener(recorder)
    try:
        # identity: a compressed transfer would make Content-Length and the digest describe
        # different bytes from the file we save.
        request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", "User-Agent": _user_agent()})
        response = opener.open(request, timeout=timeout)
    except ValueError as error:  # urllib's "unknown url type"
        raise SlimsegError(_one_line(f"cannot download {url}: not a URL ({error})")) from None
    except urllib.error.HTTPError as error:
        error.close()
        raise SlimsegError(_one_line(f"download of {url} failed: HTTP {error.code} {error.reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _unreachable(url, destination, error) from None

    with response:
        expected = (sha256 or _reported_sha256(response.headers, recorder.headers) or "").lower()
        if not expected:
            raise SlimsegError(_one_line(
                f"{url}: no sha256 to verify the download against: the server must send the file's sha256 in "
                f"an X-Linked-Etag header (as the Hugging Face hub does), or save the file as {destination} "
                "yourself"))
        total = _content_length(response.headers)
        try:
            with atomic_output(destination) as temporary:
                received, actual = _stream(response, temporary, url, destination, total, console)
                if total is not None and received != total:
                    raise SlimsegError(
                        f"download of {url} was cut off after {received} of {total} bytes; nothing was saved")
                if actual != expected:
                    raise SlimsegError(
                        f"sha256 mismatch for {url}: expected {expected}, got {actual}; the file was deleted")
        except OSError as error:
            # Read errors were already turned into SlimsegError, so this is the local disk.
            raise SlimsegError(_one_line(f"cannot write {destination}: {_reason(error)}")) from None
    return destination


def _stream(
    response: BinaryIO, temporary: Path, url: str, destination: Path, total: int | None, console: Console | None
) -> tuple[int, str]:
    """Copy the body into ``temporary``; return the byte count and the hex sha256."""
    console = console if console is not None else Console(stderr=True)
    digest = hashlib.sha256()
    received = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    if not console.is_terminal:
        # the bar is hidden off a terminal; a log still needs to say why this run took minutes
        size = f"{total / 1e6:.1f} MB" if total is not None else "size unknown"
        console.print(f"downloading {url} → {destination} ({size})", markup=False, highlight=False, soft_wrap=True)
    with progress, temporary.open("wb") as sink:
        task = progress.add_task(destination.name, total=total)
        while True:
            try:
                chunk = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as error:
                # A reset or timeout after the headers is a broken transfer, not an
                # unreachable host: say how far it got.
                of_total = f" of {total}" if total is not None else ""
                raise SlimsegError(_one_line(
                    f"download of {url} was cut off after {received}{of_total} bytes ({_reason(error)}); "
                    "nothing was saved")) from None
            if not chunk:
                break
            sink.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            progress.update(task, advance=len(chunk))
    return received, digest.hexdigest()


STALE_TEMPORARY_SECONDS = 24 * 3600


def _remove_stale_temporaries(destination: Path) -> None:
    """Delete what killed downloads of ``destination`` left (``atomic_output``'s
    ``.NAME.XXXX.tmp``). Only old ones: a fresh one may be a concurrent download's."""
    prefix, now = f".{destination.name}.", time.time()
    try:
        candidates = [p for p in destination.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:  # no cache folder yet
        return
    for candidate in candidates:
        try:
            if candidate.is_file() and now - candidate.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                candidate.unlink()
        except OSError:  # gone meanwhile, or not ours to delete: the download goes on regardless
            pass


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects like the default handler, keeping each redirect's headers,
    because the hub reports the sha256 on the redirect rather than on the CDN's reply."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _reported_sha256(final: Message, redirects: list[Message]) -> str | None:
    """The first 64-hex-digit digest header, preferring X-Linked-Etag anywhere on the
    redirect chain over a plain ETag."""
    for name in _DIGEST_HEADERS:
        for headers in (final, *reversed(redirects)):
            value = (headers.get(name) or "").strip()
            value = value.removeprefix("W/").strip('"')
            if _SHA256_HEX.fullmatch(value):
                return value
    return None


def _content_length(headers: Message) -> int | None:
    value = headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _unreachable(url: str, destination: Path, error: BaseException) -> SlimsegError:
    parts = urlsplit(url)
    host = parts.hostname or url
    try:
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:  # a malformed port still deserves the one-line message
        pass
    return SlimsegError(_one_line(
        f"cannot reach {host} ({_reason(error)}): fetch {url} yourself and save it as {destination}, "
        f"or set {BASE_URL_ENV} to a mirror that serves {destination.name}"))


def _reason(error: BaseException) -> str:
    """The human part of a network error: 'Connection refused' rather than '[Errno 111] ...'."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, str):
        return _reason(error.reason)
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _one_line(message: str) -> str:
    # The CLI prints only the first line of an error, so nothing may hide behind a newline.
    return message.replace("\r", " ").replace("\n", " ")


def _user_agent() -> str:
    from slimseg import __version__

    return f"slimseg/{__version__}"
