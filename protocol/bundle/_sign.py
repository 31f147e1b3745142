"""Ed25519 keys and detached signatures over the exact bytes of manifest.json.

``cryptography`` is imported inside each function, so ``import protocol`` stays light. Its
exceptions are translated here (one boundary): bad key material → :class:`BundleError`, a
signature that does not verify → :class:`BundleIntegrityError`.

manifest.sig holds the 64-byte signature in standard base64 on one line, ending in a newline.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

from tandem.protocol.bundle._errors import BundleError, BundleExists, BundleIntegrityError
from tandem.protocol.lazy import require

__all__ = [
    "KeySource",
    "decode_signature",
    "encode_signature",
    "generate_keypair",
    "key_fingerprint",
    "load_private_key",
    "load_public_key",
    "sign_bytes",
    "verify_bytes",
]

#: A key given as a PEM file path, PEM bytes, raw 32 key bytes, or a cryptography key object.
KeySource = Path | str | bytes | Any

_SIGNATURE_LEN = 64
_RAW_KEY_LEN = 32


def _ed25519():
    return require("cryptography.hazmat.primitives.asymmetric.ed25519")


def _serialization():
    return require("cryptography.hazmat.primitives.serialization")


def _key_bytes(key: Path | str | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key), f"the {what} key bytes"
    path = Path(key)
    try:
        return path.read_bytes(), f"{what} key file {path}"
    except FileNotFoundError:
        raise BundleError(f"{what} key file {path} does not exist") from None
    except OSError as exc:
        raise BundleError(f"{what} key file {path}: {exc.strerror or exc}") from exc


def load_private_key(key: KeySource, *, password: bytes | None = None):
    """An ``Ed25519PrivateKey`` from a PEM file, PEM bytes, raw 32 bytes, or a key object."""
    ed25519 = _ed25519()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data, where = _key_bytes(key, "private")
    try:
        if len(data) == _RAW_KEY_LEN and not data.startswith(b"-----"):
            return ed25519.Ed25519PrivateKey.from_private_bytes(data)
        loaded = _serialization().load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{where}: not a readable PEM private key ({exc})") from None
    except Exception as exc:  # UnsupportedAlgorithm and friends from cryptography
        raise BundleError(f"{where}: unsupported private key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{where}: not an ed25519 key ({type(loaded).__name__})")
    return loaded


def load_public_key(key: KeySource):
    """An ``Ed25519PublicKey`` from a PEM file, PEM bytes, raw 32 bytes, or a key object."""
    ed25519 = _ed25519()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    data, where = _key_bytes(key, "public")
    try:
        if len(data) == _RAW_KEY_LEN and not data.startswith(b"-----"):
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        loaded = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{where}: not a readable PEM public key ({exc})") from None
    except Exception as exc:  # UnsupportedAlgorithm and friends from cryptography
        raise BundleError(f"{where}: unsupported public key ({exc})") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise BundleError(f"{where}: not an ed25519 key ({type(loaded).__name__})")
    return loaded


def key_fingerprint(public_key: KeySource) -> str:
    """``sha256:<hex>`` of the raw 32-byte public key (what fleet tools show and pin)."""
    serialization = _serialization()
    raw = load_public_key(public_key).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _write_exclusive(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise BundleExists(f"{path} exists (pass overwrite=True to replace it)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_keypair(
    private_path: Path | str,
    public_path: Path | str,
    *,
    password: bytes | None = None,
    overwrite: bool = False,
) -> str:
    """Write a new ed25519 key pair as PEM (private PKCS#8, mode 0600; public SPKI, 0644).

    The private key is encrypted when ``password`` is given. Refuses existing files with
    :class:`BundleExists` unless ``overwrite``. Returns the public key's fingerprint.
    """
    serialization = _serialization()
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise BundleExists(f"{path} exists (pass overwrite=True to replace it)")
    key = _ed25519().Ed25519PrivateKey.generate()
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_exclusive(private_path, private_pem, 0o600, overwrite)
    _write_exclusive(public_path, public_pem, 0o644, overwrite)
    return key_fingerprint(key.public_key())


def sign_bytes(data: bytes, private_key: KeySource, *, password: bytes | None = None) -> bytes:
    """The raw 64-byte ed25519 signature of ``data``."""
    return load_private_key(private_key, password=password).sign(bytes(data))


def verify_bytes(data: bytes, signature: bytes, public_key: KeySource, *, what: str) -> None:
    """Raise :class:`BundleIntegrityError` (naming ``what``) unless ``signature`` verifies."""
    key = load_public_key(public_key)
    exceptions = require("cryptography.exceptions")
    try:
        key.verify(bytes(signature), bytes(data))
    except exceptions.InvalidSignature:
        raise BundleIntegrityError(
            f"{what}: signature does not verify with the configured public key"
        ) from None


def encode_signature(signature: bytes) -> bytes:
    """The content of manifest.sig: base64 of the 64 raw bytes and a newline."""
    return base64.b64encode(signature) + b"\n"


def decode_signature(content: bytes, *, what: str) -> bytes:
    """Raw signature bytes from manifest.sig content; malformed → :class:`BundleIntegrityError`."""
    try:
        raw = base64.b64decode(content.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BundleIntegrityError(f"{what}: not base64") from None
    if len(raw) != _SIGNATURE_LEN:
        raise BundleIntegrityError(f"{what}: expected a 64-byte ed25519 signature, got {len(raw)}")
    return raw
