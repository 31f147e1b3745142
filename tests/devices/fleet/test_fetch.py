"""fetch_bundle against a real local HTTP server: download, resume after an interruption with a
range request, verification (archive digest, bundle digest, signature), and refusal of tampered
or foreign bundles with nothing left behind."""

from __future__ import annotations

import base64
import hashlib
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tandem.devices.fleet import fetch_bundle
from tandem.protocol.bundle import (
    SIGNATURE_NAME,
    BundleIntegrityError,
    generate_keypair,
    load_bundle,
    pack,
    sign_bundle,
)
from tandem.protocol.errors import InvalidArgument, Unavailable
from tandem.protocol.messages import Assignment


class BundleServer:
    """A threaded HTTP/1.1 server of in-memory files, honouring ``Range: bytes=N-``, with
    knobs for misbehaviour: cut the next responses after some bytes, ignore ranges, redirect."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0
        self.cuts: list[int] = []  # bytes to send in each of the next responses, then close
        self.ignore_range = False
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cuts:
                    body = body[: server.cuts.pop(0)]
                    self.close_connection = True
                self.wfile.write(body)
                self.wfile.flush()
                server.sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="test-bundle-server")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> BundleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def release(tmp_path_factory, compiled_bundle):
    """A compiled bundle signed with the fleet's key, its archive, and a foreign key pair."""
    root = tmp_path_factory.mktemp("release")
    shutil.copytree(compiled_bundle, root / "bundle")
    generate_keypair(root / "fleet.key", root / "fleet.pub")
    generate_keypair(root / "other.key", root / "other.pub")
    sign_bundle(root / "bundle", root / "fleet.key")
    pack(root / "bundle", root / "bundle.tar.zst")
    return root


def assignment_for(release: Path, archive: Path, url: str, **changes) -> Assignment:
    data = archive.read_bytes()
    with load_bundle(archive) as bundle:
        digest, manifest = bundle.digest, bundle.manifest
        signature = base64.b64decode((bundle.root / SIGNATURE_NAME).read_bytes())
    fields = dict(device_id="cam-01", model_name=manifest.model_name, bundle_digest=digest,
                  bundle_uri=url, issued_at_ms=1, model_version=manifest.model_version,
                  archive_sha256=hashlib.sha256(data).hexdigest(), archive_size=len(data),
                  signature=signature)
    fields.update(changes)
    return Assignment(**fields)


@pytest.fixture
def server():
    with BundleServer() as s:
        yield s


def served(server: BundleServer, release: Path, archive: Path | None = None,
           path: str = "/bundles/b.tar.zst", **changes) -> Assignment:
    archive = archive or release / "bundle.tar.zst"
    server.files[path] = archive.read_bytes()
    return assignment_for(release, archive, server.url(path), **changes)


def leftovers(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if p.is_file() or (p.is_dir() and not any(p.iterdir())))


def test_fetch_downloads_verifies_and_unpacks(server, release, tmp_path):
    a = served(server, release)
    progress: list[int] = []
    path = fetch_bundle(a, tmp_path / "store", (release / "fleet.pub").read_text(),
                        progress=lambda done, total: progress.append(done))
    assert path == tmp_path / "store" / a.bundle_digest
    with load_bundle(path, public_key=release / "fleet.pub") as bundle:
        assert bundle.digest == a.bundle_digest and bundle.signature_verified
    assert progress[-1] == a.archive_size
    assert server.requests == [("/bundles/b.tar.zst", None)]
    # nothing but the bundle is left (the partial download is gone)
    assert not [p for p in leftovers(tmp_path / "store") if not p.startswith(a.bundle_digest)
                and p != ".partial"]
    # a second call finds it in place and verifies it again without downloading
    assert fetch_bundle(a, tmp_path / "store", release / "fleet.pub") == path
    assert len(server.requests) == 1


def test_an_interrupted_download_resumes_with_a_range_request(server, release, tmp_path):
    a = served(server, release)
    cut = a.archive_size // 3
    server.cuts = [cut]  # the first response breaks off after a third of the archive
    path = fetch_bundle(a, tmp_path / "store", release / "fleet.pub", retry_delay_s=0)
    assert path.is_dir()
    assert server.requests == [("/bundles/b.tar.zst", None),
                               ("/bundles/b.tar.zst", f"bytes={cut}-")]
    assert server.sent == a.archive_size  # nothing was downloaded twice


def test_a_partial_download_survives_the_call_and_the_next_one_resumes(server, release,
                                                                        tmp_path):
    a = served(server, release)
    cut = a.archive_size // 2
    server.cuts = [cut]
    with pytest.raises(Unavailable, match="kept for the next try") as info:
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub", attempts=1)
    assert info.value.retryable
    part = tmp_path / "store" / ".partial" / f"{a.archive_sha256}.part"
    assert part.stat().st_size == cut
    assert not (tmp_path / "store" / a.bundle_digest).exists()
    fetch_bundle(a, tmp_path / "store", release / "fleet.pub", attempts=1)
    assert server.requests[-1] == ("/bundles/b.tar.zst", f"bytes={cut}-")
    assert not part.exists()


def test_a_server_that_ignores_ranges_restarts_the_download(server, release, tmp_path):
    a = served(server, release)
    server.cuts = [1000]
    server.ignore_range = True
    path = fetch_bundle(a, tmp_path / "store", release / "fleet.pub", retry_delay_s=0)
    assert path.is_dir()
    assert server.requests[1] == ("/bundles/b.tar.zst", "bytes=1000-")  # answered with 200


def test_a_tampered_archive_is_refused_and_deleted(server, release, tmp_path):
    a = served(server, release)
    data = bytearray(server.files["/bundles/b.tar.zst"])
    data[len(data) // 2] ^= 0x01
    server.files["/bundles/b.tar.zst"] = bytes(data)
    with pytest.raises(BundleIntegrityError, match="sha256"):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")
    assert leftovers(tmp_path / "store") == [".partial"]


def test_a_bundle_signed_with_another_key_is_refused(server, release, tmp_path):
    """Someone who can publish assignments (but does not hold the fleet's signing key) points
    a device at their own bundle, with a matching archive digest."""
    forged = tmp_path / "forged"
    shutil.copytree(release / "bundle", forged)
    sign_bundle(forged, release / "other.key")
    pack(forged, tmp_path / "forged.tar.zst")
    a = served(server, release, archive=tmp_path / "forged.tar.zst")
    with pytest.raises(BundleIntegrityError, match="signature"):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")
    assert leftovers(tmp_path / "store") == [".partial"]


def test_a_modified_bundle_file_is_refused(server, release, tmp_path):
    """A file changed inside the bundle (archive digest updated to match): the manifest's
    per-file digest catches it."""
    bad = tmp_path / "bad"
    shutil.copytree(release / "bundle", bad)
    victim = next(p for p in sorted(bad.rglob("*.onnx")))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    archive = tmp_path / "bad.tar.gz"
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(bad.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(bad)))
    good = assignment_for(release, release / "bundle.tar.zst", "")
    server.files["/bad"] = archive.read_bytes()
    a = Assignment(**{**{f: getattr(good, f) for f in good.__dataclass_fields__},
                      "bundle_uri": server.url("/bad"),
                      "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
                      "archive_size": archive.stat().st_size})
    with pytest.raises(BundleIntegrityError):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")
    assert leftovers(tmp_path / "store") == [".partial"]


def test_the_assignments_signature_must_be_the_bundles(server, release, tmp_path):
    a = served(server, release, signature=bytes(64))
    with pytest.raises(BundleIntegrityError, match="not the signature the assignment"):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")


@pytest.mark.parametrize("changes,error", [
    ({"signature": b""}, "no signature"),
    ({"archive_sha256": ""}, "no archive sha256"),
    ({"archive_size": 0}, "archive size"),
    ({"bundle_uri": ""}, "names no URL"),
    ({"bundle_uri": "file:///etc/passwd"}, "not http"),
    ({"bundle_digest": "../../etc"}, "not a sha256"),
])
def test_an_incomplete_assignment_is_refused_before_any_download(server, release, tmp_path,
                                                                  changes, error):
    a = served(server, release, **changes)
    with pytest.raises((BundleIntegrityError, InvalidArgument), match=error):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")
    assert server.requests == []


def test_a_server_sending_more_than_the_assignment_says_is_refused(server, release, tmp_path):
    a = served(server, release)
    data = server.files["/bundles/b.tar.zst"]
    short = a.archive_size - 100
    a = Assignment(**{**{f: getattr(a, f) for f in a.__dataclass_fields__},
                      "archive_size": short,
                      "archive_sha256": hashlib.sha256(data[:short]).hexdigest()})
    with pytest.raises(BundleIntegrityError, match="announces"):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub")
    assert leftovers(tmp_path / "store") == [".partial"]


def test_mirrors_are_tried_in_order(server, release, tmp_path):
    a = served(server, release, path="/mirror/b.tar.zst")
    a = Assignment(**{**{f: getattr(a, f) for f in a.__dataclass_fields__},
                      "bundle_uri": server.url("/missing.tar.zst"),
                      "mirror_uris": (server.url("/mirror/b.tar.zst"),)})
    assert fetch_bundle(a, tmp_path / "store", release / "fleet.pub", retry_delay_s=0).is_dir()
    assert [p for p, _ in server.requests] == ["/missing.tar.zst", "/mirror/b.tar.zst"]


def test_a_redirect_to_another_scheme_is_not_followed(server, release, tmp_path):
    a = served(server, release)
    server.redirects["/bundles/b.tar.zst"] = "file:///etc/passwd"
    with pytest.raises(Unavailable):
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub", attempts=1)
    assert not (tmp_path / "store" / a.bundle_digest).exists()


def test_an_unreachable_server_is_retryable_unavailable(release, tmp_path):
    from tests._support.broker import free_port

    a = assignment_for(release, release / "bundle.tar.zst",
                       f"http://127.0.0.1:{free_port()}/b.tar.zst")
    with pytest.raises(Unavailable) as info:
        fetch_bundle(a, tmp_path / "store", release / "fleet.pub", attempts=2,
                     retry_delay_s=0)
    assert info.value.retryable
