"""The bundle: what the compiler writes and the edge daemon, cloud endpoint and fleet CLI read.

A directory (or one archive file) with ``manifest.json``, an optional detached ed25519
signature ``manifest.sig``, and the files the manifest lists by sha256 and size. The format is
described in ``protocol/bundle/BUNDLE.md``. Standard library only, plus ``cryptography`` (imported
when signing or verifying) and ``zstandard`` (imported when packing or unpacking zstd).

Write::

    with BundleWriter("out/resnet") as w:
        w.add_file("parts/head_1.onnx", head_bytes)
        w.finish(Manifest(model_name=..., ...), sign_key="keys/release.pem")

Read what one role runs on one device (only those files are verified, or extracted)::

    with open_bundle("resnet.tar.zst", public_key="keys/release.pub") as bundle:
        check_not_older(installed_version, bundle)          # no rollback unless forced
        sel = bundle.select(("head", "tail", "full"), "jetson-orin-nano-8gb")
        head = sel.heads[1]        # Runnable: .path, .backend, .source, .recipe, .optimized

or load and verify everything (``load_bundle``) and find files with ``path_of``.

Errors (each one line naming the file or field)::

    BundleError(InvalidArgument)         malformed bundle, manifest, path, archive, key file
      ManifestError                      one manifest field is wrong (.field)
    BundleNotFound(NotFound)             no bundle / manifest.json / listed file / cut
    BundleExists(FailedPrecondition)     output exists and overwrite=False
    UnsupportedVersion                   unknown manifest schema_version
    BundleIntegrityError(PermissionDenied)  digest or size mismatch, unlisted file, link,
                                         unsafe archive member, missing or bad signature
    BundleRollback(PermissionDenied)     an older bundle_version than the installed one
"""

from __future__ import annotations

from pathlib import Path

from tandem.protocol.bundle._archive import is_bundle_archive as _is_bundle_archive
from tandem.protocol.bundle._archive import pack, unpack
from tandem.protocol.bundle._dims import DimExpr, DimExprError
from tandem.protocol.bundle._errors import (
    BundleError,
    BundleExists,
    BundleIntegrityError,
    BundleNotFound,
    BundleRollback,
    ManifestError,
)
from tandem.protocol.bundle._escalation import BUILTIN_RULES, RULE_KINDS
from tandem.protocol.bundle._files import BundleWriter
from tandem.protocol.bundle._files import is_bundle_dir as _is_bundle_dir
from tandem.protocol.bundle._load import Bundle
from tandem.protocol.bundle._load import verify_dir as _verify_dir
from tandem.protocol.bundle._open import load_bundle, open_bundle
from tandem.protocol.bundle._schema import (
    CALIBRATION_TARGETS,
    DTYPES,
    ENCODINGS,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_ELEMENTS,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    SNR_LIMIT_DB,
    Artifact,
    Calibration,
    CalibrationPoint,
    Cascade,
    CutOrigin,
    CutSpec,
    EncodingCheck,
    EngineRecipe,
    EscalationRule,
    FileEntry,
    Manifest,
    TensorSpec,
    Verification,
    check_not_older,
    spec_mismatch,
)
from tandem.protocol.bundle._select import Role, Runnable, Selection
from tandem.protocol.bundle._sign import (
    KeySource,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
)
from tandem.protocol.bundle._sign import encode_signature as _encode_signature
from tandem.protocol.bundle._sign import sign_bytes as _sign_bytes
from tandem.protocol.files import atomic_write as _atomic_write

__all__ = [
    "BUILTIN_RULES",
    "CALIBRATION_TARGETS",
    "DTYPES",
    "ENCODINGS",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_ELEMENTS",
    "RULE_KINDS",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "SNR_LIMIT_DB",
    "Artifact",
    "Bundle",
    "BundleError",
    "BundleExists",
    "BundleIntegrityError",
    "BundleNotFound",
    "BundleRollback",
    "BundleWriter",
    "Calibration",
    "CalibrationPoint",
    "Cascade",
    "CutOrigin",
    "CutSpec",
    "DimExpr",
    "DimExprError",
    "EncodingCheck",
    "EngineRecipe",
    "EscalationRule",
    "FileEntry",
    "KeySource",
    "Manifest",
    "ManifestError",
    "Role",
    "Runnable",
    "Selection",
    "TensorSpec",
    "Verification",
    "bundle_kind",
    "check_not_older",
    "generate_keypair",
    "key_fingerprint",
    "load_bundle",
    "load_private_key",
    "load_public_key",
    "open_bundle",
    "pack",
    "sign_bundle",
    "spec_mismatch",
    "unpack",
]


def bundle_kind(path: Path | str) -> str | None:
    """``"directory"`` for a directory holding a bundle manifest, ``"archive"`` for an archive
    file whose first member is manifest.json, else None. Cheap, and no verification (that is
    :func:`load_bundle`): it answers "is this ours?", e.g. before replacing it."""
    path = Path(path)
    if _is_bundle_dir(path):
        return "directory"
    if _is_bundle_archive(path):
        return "archive"
    return None


def sign_bundle(
    bundle_dir: Path | str, private_key: KeySource, *, password: bytes | None = None
) -> str:
    """Sign an existing bundle directory (after verifying its digests), writing manifest.sig
    atomically; replaces an older signature. Returns the bundle digest (sha256 of manifest.json).
    """
    bundle = _verify_dir(Path(bundle_dir))
    content = (bundle.root / MANIFEST_NAME).read_bytes()
    signature = _encode_signature(_sign_bytes(content, private_key, password=password))
    _atomic_write(bundle.root / SIGNATURE_NAME, signature, mode=0o644)
    return bundle.digest
