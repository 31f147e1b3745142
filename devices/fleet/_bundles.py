"""Preparing a bundle for assignment: verify it, sign it with the fleet's key when asked, and
stage its archive for ``fleet/bundles/``.

A bundle is assigned only when every file matches the manifest and manifest.json carries a
signature that verifies with the fleet's bundle-signing public key. ``sign=True`` signs a bundle
that is unsigned (or signed by another key) with the fleet's private key, on a copy: the
operator's bundle is never modified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.devices.fleet._settings import Layout
from tandem.devices.fleet._staging import StagedFile
from tandem.protocol.errors import FailedPrecondition

__all__ = ["PreparedBundle", "archive_name", "prepare_bundle"]


def archive_name(digest: str) -> str:
    return f"{digest}.tar.zst"


@dataclass
class PreparedBundle:
    """The registry row of a bundle and its archive staged for ``fleet/bundles/`` (None when
    the same archive is there already)."""

    row: dict[str, Any]
    staged: StagedFile | None


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _signature(bundle_root: Path) -> str:
    """manifest.sig's signature as standard base64 of its 64 raw bytes."""
    from tandem.protocol.bundle import SIGNATURE_NAME, BundleIntegrityError

    try:
        raw = base64.b64decode((bundle_root / SIGNATURE_NAME).read_bytes().strip(),
                               validate=True)
    except (OSError, binascii.Error, ValueError) as exc:
        raise BundleIntegrityError(f"{bundle_root}: unreadable {SIGNATURE_NAME}") from exc
    if len(raw) != 64:
        raise BundleIntegrityError(f"{bundle_root}: {SIGNATURE_NAME} is not a 64-byte "
                                   "ed25519 signature")
    return base64.b64encode(raw).decode()


def _signed_by_fleet(root: Path, public_key: Path) -> bool:
    from tandem.protocol.bundle import BundleIntegrityError, load_bundle

    try:
        with load_bundle(root, public_key=public_key, verify_digests=False):
            return True
    except BundleIntegrityError:
        return False


def prepare_bundle(layout: Layout, path: Path | str, *, sign: bool) -> PreparedBundle:
    """Verify (and with ``sign`` sign) the bundle at ``path`` and stage its archive.

    Raises the bundle format's errors for a damaged bundle (BundleIntegrityError for a file
    that does not match its digest), and FailedPrecondition for a bundle without the fleet's
    signature when ``sign`` is false."""
    from tandem.protocol.bundle import load_bundle, pack, sign_bundle

    path = Path(path)
    layout.bundles_dir.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".prepare-", dir=layout.bundles_dir))
    try:
        with load_bundle(path) as bundle:  # every file against the manifest
            digest = bundle.digest
            manifest = bundle.manifest
            source = bundle.root
            if not (bundle.signed and _signed_by_fleet(bundle.root, layout.signing_pub)):
                if not sign:
                    why = ("signed with a key that is not this fleet's" if bundle.signed
                           else "not signed")
                    raise FailedPrecondition(
                        f"{path}: the bundle is {why}; pass --sign to sign it with the fleet's "
                        f"key ({layout.signing_key})")
                source = work / "bundle"
                shutil.copytree(bundle.root, source, symlinks=False)
                sign_bundle(source, layout.signing_key)
            signature = _signature(source)
            name = archive_name(digest)
            tmp_archive = work / name
            pack(source, tmp_archive, compression="zstd")
        sha, size = _sha256(tmp_archive)
        final = layout.bundles_dir / name
        staged: StagedFile | None = None
        if not (final.is_file() and _sha256(final) == (sha, size)):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp",
                                            dir=layout.bundles_dir)
            os.close(fd)
            os.replace(tmp_archive, tmp_name)  # out of the work directory, which is removed
            staged = StagedFile(Path(tmp_name), final)
        row = {"digest": digest, "model_name": manifest.model_name,
               "model_version": manifest.model_version, "archive_name": name,
               "archive_sha256": sha, "archive_size": size, "signature": signature}
        return PreparedBundle(row, staged)
    finally:
        shutil.rmtree(work, ignore_errors=True)
