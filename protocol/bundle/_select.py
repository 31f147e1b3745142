"""Choosing what to run from a bundle: :meth:`Bundle.select` (the choice, from the manifest alone).

For each cut and role the choice is, in order: an artifact built for exactly this device profile
(a TensorRT engine before an ONNX Runtime model), then an ONNX Runtime artifact for any device
(``device_profile == ""``), then the source ONNX part itself, run by ONNX Runtime. For the
profile ``"onnxruntime"`` (or ``"cpu"``) only ONNX Runtime artifacts are considered: one for any
device first, else one built for some CPU profile. Artifacts of targets this version does not
know are skipped, and so are cuts whose verification did not pass (they must never run).

The consumers: the cloud endpoint asks for :attr:`Role.TAIL` (cut 0's tail is the whole model);
the edge daemon for :attr:`Role.HEAD`, :attr:`Role.TAIL` (to finish locally from the split point)
and :attr:`Role.FULL`, in one call, and on a cascade bundle also :attr:`Role.SMALL` and
:attr:`Role.SCORER` (the small model and the user scorer of its escalation rule).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from tandem.protocol.bundle._errors import BundleNotFound
from tandem.protocol.bundle._schema import Artifact, EngineRecipe, Manifest
from tandem.protocol.errors import InvalidArgument

__all__ = ["BACKENDS", "CPU_PROFILES", "Role", "Runnable", "Selection", "select_from"]

#: Artifact targets this version can run.
BACKENDS = ("onnxruntime", "tensorrt")
#: Profile names meaning "ONNX Runtime on a CPU, whatever the device".
CPU_PROFILES = frozenset({"onnxruntime", "cpu"})


class Role(str, enum.Enum):
    """Which part of a cut to run."""

    HEAD = "head"  # the edge: the model up to the cut
    TAIL = "tail"  # the cloud (or an edge finishing locally): the model from the cut on
    FULL = "full"  # the whole model
    SMALL = "small"  # a cascade's small model
    SCORER = "scorer"  # a cascade's escalation scorer (an ONNX model; only for kind "scorer")


@dataclass(frozen=True)
class Runnable:
    """One model file to load, and how.

    ``path`` is the file to load (an artifact, or the source part itself), ``backend``
    ``"onnxruntime"`` or ``"tensorrt"``. ``optimized`` marks an ONNX Runtime model optimized
    ahead of time (load it with graph optimizations off). ``source`` is the part's ONNX, for a
    fallback backend (None when selected with ``sources=False``). ``recipe`` is set for TensorRT
    (how to build the engine: from ``source``, on the device, when :attr:`build_on_device`, or
    again when the bundled engine does not load on this TensorRT).
    """

    role: Role
    cut_id: int | None  # None for the whole model
    part: str  # bundle path of the source ONNX part
    path: Path
    backend: str
    optimized: bool = False
    source: Path | None = None
    artifact: Artifact | None = None
    recipe: EngineRecipe | None = None
    precision: str = "fp32"

    @property
    def build_on_device(self) -> bool:
        """True when the bundle has no engine for this part: build it from ``source``."""
        return self.artifact is not None and self.artifact.build_on_device


@dataclass(frozen=True)
class Selection:
    """What to run for some roles on one profile: ``heads`` and ``tails`` map a cut id to its
    :class:`Runnable` (only the roles asked for are filled, only cuts that have that part),
    ``full`` is the whole model (when :attr:`Role.FULL` was asked for), ``small`` and ``scorer``
    a cascade's small model and scorer (when asked for; ``scorer`` only for a scorer rule).
    ``files`` are the bundle paths the selection verified, with everything they require."""

    profile: str
    heads: Mapping[int, Runnable] = field(default_factory=dict)
    tails: Mapping[int, Runnable] = field(default_factory=dict)
    full: Runnable | None = None
    files: tuple[str, ...] = ()
    small: Runnable | None = None
    scorer: Runnable | None = None

    def for_cut(self, cut_id: int) -> tuple[Runnable | None, Runnable | None]:
        """``(head, tail)`` of one cut (None where the cut has no such part or it was not
        selected); BundleNotFound for a cut that was not selected at all."""
        if cut_id not in self.heads and cut_id not in self.tails:
            known = sorted({*self.heads, *self.tails})
            raise BundleNotFound(f"cut {cut_id} is not in this selection (cuts: {known})")
        return self.heads.get(cut_id), self.tails.get(cut_id)

    def distinct(self) -> tuple[Runnable, ...]:
        """One runnable per file to load, in a stable order: the whole model is cut 0's tail
        and the last cut's head too, and should be loaded once."""
        seen: dict[tuple[Path, str], Runnable] = {}
        for r in (*self.heads.values(), *self.tails.values(),
                  *(r for r in (self.full, self.small, self.scorer) if r is not None)):
            seen.setdefault((r.path, r.backend), r)
        return tuple(seen.values())


def _roles(role: Role | str | Iterable[Role | str]) -> frozenset[Role]:
    items = [role] if isinstance(role, (str, Role)) else list(role)
    try:
        roles = frozenset(Role(r) for r in items)
    except ValueError:
        raise InvalidArgument(f"role must be one of {', '.join(r.value for r in Role)}, "
                              f"not {role!r}") from None
    if not roles:
        raise InvalidArgument("select at least one role")
    return roles


def _choose(manifest: Manifest, part: str, profile: str) -> Artifact | None:
    arts = [a for a in manifest.artifacts if a.part == part and a.target in BACKENDS]
    ort = [a for a in arts if a.target == "onnxruntime"]
    if profile in CPU_PROFILES:
        ranked = [a for a in ort if not a.device_profile] + ort
    else:
        exact = [a for a in arts if a.device_profile == profile]
        ranked = ([a for a in exact if a.target == "tensorrt"] + exact
                  + [a for a in ort if not a.device_profile])
    return ranked[0] if ranked else None


def select_from(manifest: Manifest, root: Path, role: Role | str | Iterable[Role | str],
                profile: str, *, sources: bool = True) -> Selection:
    """The :class:`Selection` for ``role`` on ``profile`` of a bundle rooted at ``root``
    (nothing is read or verified here: :meth:`Bundle.select` verifies ``files``)."""
    roles = _roles(role)
    if not isinstance(profile, str) or not profile:
        raise InvalidArgument(f"profile must be a device profile id or 'onnxruntime', "
                              f"not {profile!r}")
    files: dict[str, None] = {}

    def runnable(r: Role, cut_id: int | None, part: str) -> Runnable:
        art = _choose(manifest, part, profile)
        if sources or art is None:
            files[part] = None
        source = root / part if sources else None
        if art is None:
            return Runnable(r, cut_id, part, root / part, "onnxruntime", source=source)
        files[art.path] = None
        return Runnable(r, cut_id, part, root / art.path, art.target,
                        optimized=art.target == "onnxruntime" and art.path != art.part,
                        source=source, artifact=art, recipe=art.engine_recipe,
                        precision=art.precision)

    usable = [c for c in manifest.cuts if c.verification.passed]
    heads = {c.id: runnable(Role.HEAD, c.id, c.head_part) for c in usable
             if Role.HEAD in roles and c.head_part is not None}
    tails = {c.id: runnable(Role.TAIL, c.id, c.tail_part) for c in usable
             if Role.TAIL in roles and c.tail_part is not None}
    full = None
    if Role.FULL in roles:
        part = manifest.full_part
        if part is None:
            raise BundleNotFound(f"bundle {manifest.model_name!r} holds no whole model (no "
                                 "cloud-only or all-local cut)")
        full = runnable(Role.FULL, None, part)
    small = scorer = None
    if roles & {Role.SMALL, Role.SCORER}:
        cascade = manifest.cascade
        if cascade is None:
            raise BundleNotFound(f"bundle {manifest.model_name!r} is not a cascade (no small "
                                 "model)")
        if Role.SMALL in roles:
            small = runnable(Role.SMALL, None, cascade.small_part)
        if Role.SCORER in roles and cascade.rule.scorer_part is not None:
            scorer = runnable(Role.SCORER, None, cascade.rule.scorer_part)
    return Selection(profile, MappingProxyType(heads), MappingProxyType(tails), full,
                     manifest.closure(files), small, scorer)
