"""The bundle: what the compiler writes and the edge daemon, cloud endpoint and fleet CLI read.

A directory (or one archive file) with ``manifest.json``, an optional detached ed25519
signature ``manifest.sig``, and the files the manifest lists by sha256 and size. The format is
described in ``protocol/bundle/BUNDLE.md``. Standard library only, plus ``cryptography`` (imported
when signing or verifying) and ``zstandard`` (imported when packing or unpacking zstd).

Write::

    with BundleWriter("out/resnet") as w:
        w.add_file("parts/head_1.onnx", head_bytes)
        w.finish(Manifest(model_name=..., ...), sign_key="keys/release.pem")

Read::

    bundle = load_bundle("resnet.tar.zst", public_key="keys/release.pub")
    cut = bundle.manifest.cut(1)
    head = bundle.path_of(cut.head_part)

Errors (each one line naming the file or field)::

    BundleError(InvalidArgument)         malformed bundle, manifest, path, archive, key file
      ManifestError                      one manifest field is wrong (.field)
    BundleNotFound(NotFound)             no bundle / manifest.json / listed file / cut
    BundleExists(FailedPrecondition)     output exists and overwrite=False
    UnsupportedVersion                   unknown manifest schema_version
    BundleIntegrityError(PermissionDenied)  digest or size mismatch, unlisted file, link,
                                         unsafe archive member, missing or bad signature
"""

from __future__ import annotations

import os as _os
import tempfile as _tempfile
from pathlib import Path

from tandem.protocol.bundle._archive import extract_into as _extract_into
from tandem.protocol.bundle._archive import pack, unpack
from tandem.protocol.bundle._dims import DimExpr, DimExprError
from tandem.protocol.bundle._errors import (
    BundleError,
    BundleExists,
    BundleIntegrityError,
    BundleNotFound,
    ManifestError,
)
from tandem.protocol.bundle._files import BundleWriter
from tandem.protocol.bundle._files import remove_tree as _remove_tree
from tandem.protocol.bundle._load import Bundle
from tandem.protocol.bundle._load import verify_dir as _verify_dir
from tandem.protocol.bundle._schema import (
    DTYPES,
    ENCODINGS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    SNR_LIMIT_DB,
    Artifact,
    CutOrigin,
    CutSpec,
    EncodingCheck,
    FileEntry,
    Manifest,
    TensorSpec,
    Verification,
)
from tandem.protocol.bundle._sign import KeySource, generate_keypair, key_fingerprint
from tandem.protocol.bundle._sign import encode_signature as _encode_signature
from tandem.protocol.bundle._sign import sign_bytes as _sign_bytes

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "SNR_LIMIT_DB",
    "Artifact",
    "Bundle",
    "BundleError",
    "BundleExists",
    "BundleIntegrityError",
    "BundleNotFound",
    "BundleWriter",
    "CutOrigin",
    "CutSpec",
    "DimExpr",
    "DimExprError",
    "EncodingCheck",
    "FileEntry",
    "KeySource",
    "Manifest",
    "ManifestError",
    "TensorSpec",
    "Verification",
    "generate_keypair",
    "key_fingerprint",
    "load_bundle",
    "pack",
    "sign_bundle",
    "unpack",
]


def load_bundle(
    path: Path | str,
    public_key: KeySource | None = None,
    verify_digests: bool = True,
    *,
    extract_to: Path | str | None = None,
) -> Bundle:
    """Load and verify a bundle directory or archive file.

    With ``public_key`` (PEM path, PEM bytes, raw 32 bytes or a key object) the bundle must
    carry a manifest.sig that verifies. ``verify_digests=False`` still checks that every listed
    file exists with its size and that nothing unlisted is there, but skips hashing.

    An archive is extracted to ``extract_to`` (which must not exist; it stays after the bundle
    is closed) or else to a temporary directory that ``Bundle.close()`` removes.
    """
    path = Path(path)
    if not _os.path.exists(path):
        raise BundleNotFound(f"{path}: no bundle directory or archive here")
    if path.is_dir():
        return _verify_dir(path, public_key=public_key, verify_digests=verify_digests)
    if extract_to is not None:
        target = unpack(path, extract_to, verify=False)
        try:
            return _verify_dir(
                target, public_key=public_key, verify_digests=verify_digests, label=str(path)
            )
        except BaseException:
            _remove_tree(target)
            raise
    tmp = Path(_tempfile.mkdtemp(prefix="tandem-bundle-"))
    try:
        _extract_into(path, tmp)
        return _verify_dir(
            tmp,
            public_key=public_key,
            verify_digests=verify_digests,
            label=str(path),
            owned_dir=tmp,
        )
    except BaseException:
        _remove_tree(tmp)
        raise


def sign_bundle(
    bundle_dir: Path | str, private_key: KeySource, *, password: bytes | None = None
) -> str:
    """Sign an existing bundle directory (after verifying its digests), writing manifest.sig
    atomically; replaces an older signature. Returns the bundle digest (sha256 of manifest.json).
    """
    bundle = _verify_dir(Path(bundle_dir))
    content = (bundle.root / MANIFEST_NAME).read_bytes()
    signature = _encode_signature(_sign_bytes(content, private_key, password=password))
    fd, tmp_name = _tempfile.mkstemp(prefix=f".{bundle.root.name}.sig-", dir=bundle.root.parent)
    try:
        with _os.fdopen(fd, "wb") as f:
            f.write(signature)
            f.flush()
            _os.fsync(f.fileno())
        _os.chmod(tmp_name, 0o644)
        _os.replace(tmp_name, bundle.root / SIGNATURE_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return bundle.digest
