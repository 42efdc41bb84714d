"""slimseg.zoo.download against a loopback HTTP server: verified, atomic, offline-aware."""

from __future__ import annotations

import hashlib
import io
import socket
from pathlib import Path

import pytest
from loopback import Route, Server
from rich.console import Console

from slimseg.errors import SlimsegError
from slimseg.zoo.download import download_file, file_sha256, mirror_url, offline_requested

BODY = bytes(range(256)) * (3 * 4096)  # 3 MiB: several 1 MiB chunks
BODY_SHA = hashlib.sha256(BODY).hexdigest()


def _quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def _fetch(url: str, destination: Path, sha256: str | None, **kwargs: object) -> Path:
    return download_file(url, destination, sha256, console=_quiet(), timeout=5.0, **kwargs)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_with_given_sha256(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    target = tmp_path / "cache" / "m.pth"
    assert _fetch(f"{server.base}/m.pth", target, BODY_SHA) == target
    assert target.read_bytes() == BODY
    assert _names(target.parent) == ["m.pth"]


def test_sha256_comparison_ignores_case(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    _fetch(f"{server.base}/m.pth", tmp_path / "m.pth", BODY_SHA.upper())
    assert (tmp_path / "m.pth").read_bytes() == BODY


def test_hub_linked_etag_supplies_the_digest(server: Server, tmp_path: Path) -> None:
    server.routes["/hub.pth"] = Route(body=BODY, headers={"X-Linked-Etag": f'"{BODY_SHA}"', "ETag": '"abc123"'})
    target = tmp_path / "cache" / "hub.pth"
    _fetch(f"{server.base}/hub.pth", target, None)
    assert target.read_bytes() == BODY


def test_plain_sha256_etag_is_accepted(server: Server, tmp_path: Path) -> None:
    server.routes["/e.pth"] = Route(body=BODY, headers={"ETag": f'"{BODY_SHA}"'})
    _fetch(f"{server.base}/e.pth", tmp_path / "e.pth", None)
    assert (tmp_path / "e.pth").read_bytes() == BODY


def test_linked_etag_on_a_redirect_is_used(server: Server, tmp_path: Path) -> None:
    # The hub answers /resolve/ with a 302 carrying X-Linked-Etag; the CDN reply has none.
    server.routes["/resolve/r.pth"] = Route(302, {"Location": "/cdn/r.pth", "X-Linked-Etag": f'"{BODY_SHA}"'})
    server.routes["/cdn/r.pth"] = Route(body=BODY)
    _fetch(f"{server.base}/resolve/r.pth", tmp_path / "r.pth", None)
    assert (tmp_path / "r.pth").read_bytes() == BODY
    assert server.requests == ["/resolve/r.pth", "/cdn/r.pth"]


def test_wrong_sha256_deletes_the_file(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    url = f"{server.base}/m.pth"
    with pytest.raises(SlimsegError) as caught:
        _fetch(url, tmp_path / "m.pth", "0" * 64)
    assert str(caught.value) == f"sha256 mismatch for {url}: expected {'0' * 64}, got {BODY_SHA}; the file was deleted"
    assert _names(tmp_path) == []


def test_wrong_linked_etag_deletes_the_file(server: Server, tmp_path: Path) -> None:
    server.routes["/hub.pth"] = Route(body=BODY, headers={"X-Linked-Etag": f'"{"f" * 64}"'})
    with pytest.raises(SlimsegError, match="sha256 mismatch"):
        _fetch(f"{server.base}/hub.pth", tmp_path / "hub.pth", None)
    assert _names(tmp_path) == []


@pytest.mark.parametrize(("status", "reason"), [(500, "Internal Server Error"), (404, "Not Found")])
def test_http_error(server: Server, tmp_path: Path, status: int, reason: str) -> None:
    server.routes["/m.pth"] = Route(status, body=b"nope")
    url = f"{server.base}/m.pth"
    with pytest.raises(SlimsegError) as caught:
        _fetch(url, tmp_path / "m.pth", BODY_SHA)
    assert str(caught.value) == f"download of {url} failed: HTTP {status} {reason}"
    assert _names(tmp_path) == []


def test_transfer_cut_midway(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY, behaviour="cut")
    with pytest.raises(SlimsegError, match=r"was cut off after \d+ of 3145728 bytes; nothing was saved") as caught:
        _fetch(f"{server.base}/m.pth", tmp_path / "m.pth", BODY_SHA)
    assert "\n" not in str(caught.value)
    assert _names(tmp_path) == []


def test_failed_redownload_keeps_the_previous_file(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "m.pth"
    target.write_bytes(b"previous good file")
    server.routes["/cut.pth"] = Route(body=BODY, behaviour="cut")
    server.routes["/bad.pth"] = Route(body=BODY)
    server.routes["/gone.pth"] = Route(500)
    for path, digest in (("/cut.pth", BODY_SHA), ("/bad.pth", "1" * 64), ("/gone.pth", BODY_SHA)):
        with pytest.raises(SlimsegError):
            _fetch(server.base + path, target, digest)
        assert target.read_bytes() == b"previous good file"
        assert _names(tmp_path) == ["m.pth"]


def test_no_sha256_available_is_refused(server: Server, tmp_path: Path) -> None:
    # An MD5-looking ETag (what S3 sends) must not pass for a sha256.
    server.routes["/m.pth"] = Route(body=BODY, headers={"ETag": '"' + hashlib.md5(BODY).hexdigest() + '"'})
    url = f"{server.base}/m.pth"
    with pytest.raises(SlimsegError) as caught:
        _fetch(url, tmp_path / "cache" / "m.pth", None)
    target = tmp_path / "cache" / "m.pth"
    assert str(caught.value) == (
        f"{url}: no sha256 to verify the download against: the server must send the file's sha256 in an "
        f"X-Linked-Etag header (as the Hugging Face hub does), or save the file as {target} yourself")
    assert _names(tmp_path / "cache") == []


def test_a_plain_mirror_of_a_hub_model_says_what_to_do(server: Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import slimseg

    server.routes["/m/slimsam-77-uniform.safetensors"] = Route(body=BODY)
    monkeypatch.setenv("SLIMSEG_BASE_URL", f"{server.base}/m")
    monkeypatch.setenv("SLIMSEG_HOME", str(tmp_path / "cache"))
    with pytest.raises(SlimsegError) as caught:
        slimseg.load_model("slimsam-77", device="cpu")
    message = str(caught.value)
    assert "X-Linked-Etag" in message and str(tmp_path / "cache" / "slimsam-77-uniform.safetensors") in message


@pytest.mark.parametrize("value", ["not a url", "host/path", "http://"])
def test_malformed_base_url_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SLIMSEG_BASE_URL", value)
    with pytest.raises(SlimsegError) as caught:
        mirror_url("https://example.org/m.pth", "m.pth")
    assert str(caught.value).startswith(f"SLIMSEG_BASE_URL={value!r} is not a URL")


def test_not_a_url_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SlimsegError, match="cannot download not a url/m.pth: not a URL"):
        _fetch("not a url/m.pth", tmp_path / "m.pth", BODY_SHA)


def test_old_temporaries_of_killed_downloads_are_removed(server: Server, tmp_path: Path) -> None:
    import os
    import time

    old, fresh, other = tmp_path / ".m.pth.abc123.tmp", tmp_path / ".m.pth.def456.tmp", tmp_path / ".x.pth.abc.tmp"
    for leftover in (old, fresh, other):
        leftover.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    for leftover in (old, other):
        os.utime(leftover, (two_days_ago, two_days_ago))
    server.routes["/m.pth"] = Route(body=BODY)
    _fetch(f"{server.base}/m.pth", tmp_path / "m.pth", BODY_SHA)
    # a fresh one may belong to a download running beside this one; another file's is not ours
    assert _names(tmp_path) == sorted([fresh.name, other.name, "m.pth"])


def test_off_a_terminal_one_plain_line_says_what_is_downloaded(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    console = _quiet()
    target = tmp_path / "m.pth"
    download_file(f"{server.base}/m.pth", target, BODY_SHA, console=console, timeout=5.0)
    assert console.file.getvalue() == f"downloading {server.base}/m.pth → {target} (3.1 MB)\n"


def test_offline_argument_makes_no_request(server: Server, tmp_path: Path) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    url, target = f"{server.base}/m.pth", tmp_path / "m.pth"
    with pytest.raises(SlimsegError) as caught:
        _fetch(url, target, BODY_SHA, offline=True)
    assert str(caught.value) == f"offline: fetch {url} and save it as {target}"
    assert server.requests == []
    assert _names(tmp_path) == []


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_offline_environment_makes_no_request(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              value: str) -> None:
    monkeypatch.setenv("SLIMSEG_OFFLINE", value)
    assert offline_requested()
    server.routes["/m.pth"] = Route(body=BODY)
    url, target = f"{server.base}/m.pth", tmp_path / "m.pth"
    with pytest.raises(SlimsegError, match="offline") as caught:
        _fetch(url, target, BODY_SHA)
    assert url in str(caught.value) and str(target) in str(caught.value)
    assert server.requests == []


@pytest.mark.parametrize("value", ["", "0", "no", "off", "false"])
def test_offline_environment_off(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SLIMSEG_OFFLINE", value)
    assert not offline_requested()


def test_connection_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, target = f"http://127.0.0.1:{port}/m.pth", tmp_path / "m.pth"
    with pytest.raises(SlimsegError) as caught:
        _fetch(url, target, BODY_SHA)
    message = str(caught.value)
    assert message.startswith(f"cannot reach 127.0.0.1:{port} (")
    assert f"fetch {url} yourself and save it as {target}" in message
    # --offline would only print the same instruction: say what the user can do instead
    assert message.endswith(f"or set SLIMSEG_BASE_URL to a mirror that serves {target.name}")
    assert "\n" not in message
    assert _names(tmp_path) == []


def test_mirror_url(monkeypatch: pytest.MonkeyPatch) -> None:
    default = "https://example.org/weights/m.pth"
    monkeypatch.delenv("SLIMSEG_BASE_URL", raising=False)
    assert mirror_url(default, "m.pth") == default
    monkeypatch.setenv("SLIMSEG_BASE_URL", "http://127.0.0.1:8765/models/")
    assert mirror_url(default, "m.pth") == "http://127.0.0.1:8765/models/m.pth"
    monkeypatch.setenv("SLIMSEG_BASE_URL", "http://127.0.0.1:8765/models")
    assert mirror_url(default, "m.pth") == "http://127.0.0.1:8765/models/m.pth"


def test_mirror_url_serves_the_download(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.routes["/models/m.pth"] = Route(body=BODY)
    monkeypatch.setenv("SLIMSEG_BASE_URL", server.base + "/models")
    _fetch(mirror_url("https://example.org/m.pth", "m.pth"), tmp_path / "m.pth", BODY_SHA)
    assert server.requests == ["/models/m.pth"]


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(BODY)
    assert file_sha256(path) == BODY_SHA
    assert file_sha256(path, chunk_size=1000) == BODY_SHA
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_interrupt_removes_the_temporary_file(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.routes["/m.pth"] = Route(body=BODY)
    import slimseg.zoo.download as download

    class _Interrupting(download.Progress):
        def update(self, *args: object, **kwargs: object) -> None:  # first chunk written, then Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "Progress", _Interrupting)
    with pytest.raises(KeyboardInterrupt):
        _fetch(f"{server.base}/m.pth", tmp_path / "m.pth", BODY_SHA)
    assert _names(tmp_path) == []
