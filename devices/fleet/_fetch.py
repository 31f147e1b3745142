"""Fetching an assigned bundle on the device: download with resume, verify, unpack.

    path = fetch_bundle(assignment, "/var/lib/tandem/bundles", public_key=enrollment_pub_pem)

1. The archive is downloaded from ``assignment.bundle_uri`` (then each mirror) into
   ``DEST/.partial/<archive_sha256>.part``. A partial file left by an interrupted download is
   continued with an HTTP range request (``Range: bytes=N-``); a server that answers 200 instead
   of 206 starts it over. Never more than ``archive_size`` bytes are written.
2. Its size and sha256 must be the assignment's, else the partial is deleted and
   :class:`BundleIntegrityError` raised.
3. It is unpacked (the bundle format's safe extraction) into a hidden staging directory;
   manifest.sig must be the assignment's signature (written from it if the archive has none),
   every file must match the manifest, the manifest's sha256 must be ``bundle_digest`` and the
   signature must verify with the fleet's bundle-signing public key.
4. Only then is the directory renamed to ``DEST/<bundle_digest>`` (atomic), and returned.

A bundle already in place is checked again and returned without a download. Transfer problems
raise :class:`Unavailable` (retryable; the partial download is kept for the next call); a bundle
that fails verification raises :class:`BundleIntegrityError` and leaves nothing behind.

HTTP is the standard library's ``urllib`` (no dependency on the device); run this in a worker
thread from asyncio code.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tandem.protocol.errors import InvalidArgument, TandemError, Unavailable
from tandem.protocol.messages import Assignment

__all__ = ["DEFAULT_MAX_ARCHIVE_BYTES", "fetch_bundle"]

DEFAULT_MAX_ARCHIVE_BYTES = 64 << 30  # what the bundle format itself allows
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _DiskError(Unavailable):
    """The partial download cannot be written here: no other URL will help."""

    retryable = False


class _NoUnsafeRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to {newurl!r} refused",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _integrity_error(message: str) -> Exception:
    from tandem.protocol.bundle import BundleIntegrityError

    return BundleIntegrityError(message)


def _check_assignment(a: Assignment, max_archive_bytes: int) -> list[str]:
    if not _HEX64.fullmatch(a.bundle_digest):
        raise InvalidArgument(f"assignment for {a.device_id!r}: bundle_digest is not a sha256")
    if not _HEX64.fullmatch(a.archive_sha256):
        raise _integrity_error(f"assignment for {a.device_id!r} carries no archive sha256: "
                               "refusing an unverifiable download")
    if len(a.signature) != 64:
        raise _integrity_error(f"assignment for {a.device_id!r} carries no signature: "
                               "refusing an unsigned bundle")
    if not 0 < a.archive_size <= max_archive_bytes:
        raise _integrity_error(f"assignment for {a.device_id!r}: archive size "
                               f"{a.archive_size} is not in 1..{max_archive_bytes}")
    urls = [u for u in (a.bundle_uri, *a.mirror_uris) if u]
    if not urls:
        raise InvalidArgument(f"assignment for {a.device_id!r} names no URL")
    for url in urls:
        if urlsplit(url).scheme not in ("http", "https"):
            raise InvalidArgument(f"assignment for {a.device_id!r}: {url!r} is not http(s)")
    return urls


class _Partial:
    """The partial download: its file, how much of it there is, and the running sha256."""

    def __init__(self, path: Path, expected_size: int) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if path.stat().st_size > expected_size:
                path.unlink()
            else:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        self.hash.update(chunk)
                        self.size += len(chunk)

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hash = hashlib.sha256()
        self.size = 0


def _download(url: str, part: _Partial, total: int, timeout_s: float,
              progress: Callable[[int, int], None] | None, opener) -> None:
    """Continue ``part`` from ``url`` up to ``total`` bytes. Raises Unavailable on transfer
    problems (what was received stays in the partial), BundleIntegrityError when the server
    sends more than ``total`` bytes."""
    headers = {"Accept-Encoding": "identity", "User-Agent": "tandem-fleet-fetch/1"}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and part.size:
                part.restart()  # our partial does not fit what the server has: start over
                raise Unavailable(f"{url}: range not satisfiable; restarting") from None
            raise Unavailable(f"{url}: HTTP {exc.code} {exc.reason}",
                              retryable=exc.code >= 500 or exc.code in (408, 429)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"{url}: {reason}") from exc
    with contextlib.closing(response):
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise Unavailable(f"{url}: unexpected Content-Encoding {encoding!r}",
                              retryable=False)
        status = response.status
        if status == 206 and part.size:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != part.size or \
                    (match.group(3) != "*" and int(match.group(3)) != total):
                part.restart()
                raise Unavailable(f"{url}: Content-Range does not continue the download "
                                  f"({response.headers.get('Content-Range')!r}); restarting")
        elif status == 200:
            if part.size:
                part.restart()  # the server ignored the range: take it from the start
        else:
            raise Unavailable(f"{url}: unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and part.size + int(length) > total:
            part.restart()
            raise _integrity_error(f"{url}: the server announces {part.size + int(length)} "
                                   f"bytes, the assignment says {total}")
        with open(part.path, "ab") as out:
            while part.size < total:
                try:
                    chunk = response.read(min(_CHUNK, total - part.size))
                except (OSError, http.client.HTTPException) as exc:
                    raise Unavailable(f"{url}: transfer interrupted at {part.size} of {total} "
                                      f"bytes ({exc or type(exc).__name__})") from exc
                if not chunk:
                    break
                try:
                    out.write(chunk)
                    out.flush()
                except OSError as exc:
                    raise _DiskError(f"cannot write {part.path}: {exc.strerror or exc}") \
                        from exc
                part.hash.update(chunk)
                part.size += len(chunk)
                if progress is not None:
                    progress(part.size, total)
            with contextlib.suppress(OSError):
                os.fsync(out.fileno())
        if part.size == total:
            with contextlib.suppress(OSError, http.client.HTTPException):
                extra = response.read(1)
                if extra:
                    part.restart()
                    raise _integrity_error(f"{url}: the server sent more than the {total} "
                                           "bytes the assignment says")
    if part.size < total:
        raise Unavailable(f"{url}: transfer ended at {part.size} of {total} bytes")


def _verify_in_place(path: Path, assignment: Assignment, public_key: Any) -> bool:
    from tandem.protocol.bundle import BundleError, load_bundle

    try:
        with load_bundle(path, public_key=public_key) as bundle:
            return bundle.digest == assignment.bundle_digest
    except (BundleError, TandemError):
        return False


def _unpack_verified(archive: Path, dest: Path, assignment: Assignment,
                     public_key: Any) -> Path:
    from tandem.protocol.bundle import SIGNATURE_NAME, load_bundle, unpack

    final = dest / assignment.bundle_digest
    staging_parent = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
    try:
        staged = unpack(archive, staging_parent / "bundle", verify=False)
        sig_path = staged / SIGNATURE_NAME
        expected = base64.b64encode(assignment.signature) + b"\n"
        if sig_path.exists():
            try:
                carried = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
            except ValueError:
                carried = b""
            if carried != assignment.signature:
                raise _integrity_error(f"{archive.name}: its {SIGNATURE_NAME} is not the "
                                       "signature the assignment carries")
        else:
            sig_path.write_bytes(expected)
        with load_bundle(staged, public_key=public_key) as bundle:
            if bundle.digest != assignment.bundle_digest:
                raise _integrity_error(
                    f"{archive.name}: the bundle's digest is {bundle.digest}, the assignment "
                    f"says {assignment.bundle_digest}")
        if final.exists():
            shutil.rmtree(final)
        os.rename(staged, final)
        return final
    finally:
        shutil.rmtree(staging_parent, ignore_errors=True)


def fetch_bundle(
    assignment: Assignment,
    dest: Path | str,
    public_key: Any,
    *,
    timeout_s: float = 30.0,
    attempts: int = 3,
    retry_delay_s: float = 1.0,
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download, verify and unpack the bundle of ``assignment`` into ``dest/<bundle_digest>``
    and return that directory (see the module docstring).

    ``public_key``: the fleet's ed25519 bundle-signing key (PEM text or bytes, a PEM file path,
    raw 32 bytes or a key object; an enrollment's ``bundle_public_key_pem``). ``attempts``
    bounds the tries per call over all URLs (each continues the partial download);
    ``timeout_s`` is the socket timeout of each read."""
    urls = _check_assignment(assignment, max_archive_bytes)
    if isinstance(public_key, str) and public_key.lstrip().startswith("-----BEGIN"):
        public_key = public_key.encode()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / assignment.bundle_digest
    if final.is_dir():
        if _verify_in_place(final, assignment, public_key):
            return final
        shutil.rmtree(final)  # damaged or foreign: fetch it again
    part = _Partial(dest / ".partial" / f"{assignment.archive_sha256}.part",
                    assignment.archive_size)
    opener = urllib.request.build_opener(_NoUnsafeRedirects())
    errors: list[str] = []
    for attempt in range(max(1, attempts)):
        if part.size == assignment.archive_size:
            break
        url = urls[attempt % len(urls)]
        try:
            _download(url, part, assignment.archive_size, timeout_s, progress, opener)
        except _DiskError:
            raise
        except Unavailable as exc:
            errors.append(str(exc))
            if not exc.retryable and len(urls) == 1:
                break
            if attempt + 1 < attempts:
                time.sleep(retry_delay_s)
            continue
        break
    if part.size != assignment.archive_size:
        raise Unavailable(f"could not download the bundle {assignment.bundle_digest[:12]} "
                          f"({part.size} of {assignment.archive_size} bytes so far, kept for "
                          f"the next try): {errors[-1] if errors else 'no attempt'}")
    if part.hash.hexdigest() != assignment.archive_sha256:
        part.restart()
        raise _integrity_error(
            f"the downloaded archive's sha256 is {part.hash.hexdigest()}, the assignment says "
            f"{assignment.archive_sha256}: refused and deleted")
    try:
        path = _unpack_verified(part.path, dest, assignment, public_key)
    except BaseException:
        part.restart()  # a bad archive is not worth resuming
        raise
    part.restart()
    return path
