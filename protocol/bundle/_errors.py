"""Errors of the bundle format (re-exported by :mod:`tandem.protocol.bundle`).

Tree (each subclasses the wire code it carries)::

    InvalidArgument
    └── BundleError              a malformed bundle, manifest, path, archive or key file
        └── ManifestError        one manifest field is wrong (``.field`` names it)
    NotFound
    └── BundleNotFound           no bundle, no manifest.json, a listed file missing, unknown cut
    FailedPrecondition
    └── BundleExists             the output already exists and ``overwrite`` was not given
    UnsupportedVersion           (raised as is) a manifest ``schema_version`` this reader
                                 does not know
    PermissionDenied
    ├── BundleIntegrityError     tampering: digest or size mismatch, unlisted file, link, unsafe
    │                            archive member, missing or bad signature
    └── BundleRollback           a bundle older (lower bundle_version) than the one installed
"""

from __future__ import annotations

from tandem.protocol.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

__all__ = [
    "BundleError",
    "BundleExists",
    "BundleIntegrityError",
    "BundleNotFound",
    "BundleRollback",
    "ManifestError",
]


class BundleError(InvalidArgument):
    """A bundle, manifest, path, archive or key that is malformed (not tampered with)."""


class ManifestError(BundleError):
    """One manifest field is wrong; ``field`` is its dotted path (``cuts[1].verification.passed``).

    ``source`` (when set) names the file the manifest came from; the message is one line:
    ``<source>: <field>: <problem>``.
    """

    def __init__(self, field: str, problem: str, *, source: str = "") -> None:
        self.field = field
        self.problem = problem
        self.source = source
        where = f"{field}: " if field else ""
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{where}{problem}")

    def under(self, parent: str) -> ManifestError:
        """The same problem, with ``parent`` prepended to the field path."""
        field = f"{parent}.{self.field}" if self.field else parent
        return ManifestError(field, self.problem, source=self.source)

    def from_source(self, source: str) -> ManifestError:
        return ManifestError(self.field, self.problem, source=source)

    def __reduce__(self):
        return (_rebuild_manifest_error, (self.field, self.problem, self.source))


def _rebuild_manifest_error(field: str, problem: str, source: str) -> ManifestError:
    return ManifestError(field, problem, source=source)


class BundleNotFound(NotFound):
    """No bundle at the path, no manifest.json, a listed file that is missing, or an unknown cut."""


class BundleExists(FailedPrecondition):
    """The output directory or archive exists and ``overwrite=True`` was not given."""


class BundleIntegrityError(PermissionDenied):
    """The bundle was changed after it was written, or its signature does not verify."""


class BundleRollback(PermissionDenied):
    """A bundle whose ``bundle_version`` is lower than the installed one: an older release,
    perhaps signed by the same key, that would roll the device back."""
