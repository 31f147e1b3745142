"""Rollout on the device: a new :class:`~tandem.protocol.Assignment` on
``tandem/v1/assign/<device>`` (retained) becomes the bundle being served.

1. **Download** with resume and **verify** (the fleet's ``fetch_bundle``: archive sha256 and
   size, every file's digest, the manifest's digest = the assignment's, the ed25519 signature
   with the bundle-signing public key) into ``<state_dir>/bundles/<digest>``. A daemon without
   a public key refuses every assignment (bundles must be signed).
2. **Not older** than the bundle being served (``check_not_older``: its ``bundle_version``)
   unless ``allow_downgrade``; a bundle of another model is not ordered against it.
3. **Load and profile** it beside the running one (the profile table is stored under its own
   digest); a bundle that fails here is refused and the running one keeps serving.
4. **Switch** atomically (:meth:`EdgeDaemon._install`): a request already running finishes on
   the bundle it started on, the next one runs on the new one; the old one is closed once its
   last request ends. The new digest goes out in a heartbeat at once.
5. ``<state_dir>/current.json`` records the bundle and the one before it, so a restart serves
   the assigned bundle, and one that no longer loads falls back to the previous (roll back).

Every outcome is logged, counted (``tandem_edge_rollouts_total{result}``) and shown in
``GET /v2/edge/status`` (``rollout``); a refusal also goes out at once in the heartbeat
(``DeviceStatus.refused_digest``/``refused_reason``, what ``tandem fleet status`` shows) and
stays there until a later rollout ends otherwise; a refused digest is not downloaded again; a
download that failed on the way (no server, a broken connection: retryable) is tried again,
backing off from 2 s to 5 min, until it succeeds or a newer assignment comes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.protocol.bundle import check_not_older
from tandem.protocol.errors import (
    FailedPrecondition,
    MissingDependency,
    PermissionDenied,
    TandemError,
)
from tandem.protocol.files import atomic_write

__all__ = ["Rollout"]

log = logging.getLogger("tandem.edge.rollout")

_KEEP_BUNDLES = 2  # the current bundle and the previous one
_RETRY_MIN_S = 2.0  # a download that failed on the way is tried again, backing off to
_RETRY_MAX_S = 300.0


class Rollout:
    """Applies assignments for an :class:`~tandem.edge._daemon.EdgeDaemon` (module docstring).
    ``fetch_bundle(assignment, dest, public_key) -> Path`` defaults to the fleet's."""

    def __init__(self, daemon: Any, *, fetch_bundle: Callable[..., Path] | None = None) -> None:
        self.daemon = daemon
        self._fetch = fetch_bundle
        self.dir = daemon.state_dir / "bundles"
        self.record = daemon.state_dir / "current.json"
        self._latest: Any = None
        self._task: asyncio.Task | None = None
        self._refused: dict[str, str] = {}
        self._submitted = 0  # assignments seen: a retry stands down when a newer one came
        self._retry_s = _RETRY_MIN_S

    # -- which bundle to start with -------------------------------------------------------------

    def _read_record(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.record.read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.record, exc)
            return {}

    def _write_record(self, current: Path, previous: Path | None) -> None:
        doc = {"current": str(current), "previous": str(previous) if previous else None,
               "updated_at": time.time()}
        atomic_write(self.record, json.dumps(doc))

    def initial_bundle_path(self) -> Path | None:
        """The bundle to serve at start: the assigned one a rollout recorded (so a restart
        keeps it), else ``--bundle``. See :meth:`fallback_paths`."""
        paths = self.candidate_paths()
        return paths[0] if paths else None

    def candidate_paths(self) -> list[Path]:
        doc = self._read_record()
        out = [Path(p) for p in (doc.get("current"), doc.get("previous")) if isinstance(p, str)
               and Path(p).exists()]
        if self.daemon.config.bundle is not None:
            out.append(Path(self.daemon.config.bundle))
        seen: list[Path] = []
        for p in out:
            if p not in seen:
                seen.append(p)
        return seen

    # -- assignments ----------------------------------------------------------------------------

    def submit(self, assignment: Any) -> None:
        """Apply ``assignment`` (the latest wins; one rollout at a time)."""
        self._submitted += 1
        self._latest = assignment
        if self._task is None or self._task.done():
            self._task = self.daemon.spawn(self._run(), "edge rollout")

    async def _run(self) -> None:
        while self._latest is not None:
            assignment, self._latest = self._latest, None
            try:
                await self.apply(assignment)
            except Exception:  # our bug: the daemon keeps serving what it serves
                log.exception("rollout of %s failed", assignment.bundle_digest[:12])

    def _report(self, result: str, assignment: Any, detail: str) -> None:
        d = self.daemon
        d.last_rollout = {"result": result, "digest": assignment.bundle_digest,
                          "model": assignment.model_name, "detail": detail,
                          "at": time.time()}
        if d.metrics is not None:
            d.metrics.rollouts.labels(result).inc()
        (log.info if result in ("applied", "current") else log.error)(
            "assignment of bundle %s: %s (%s)", assignment.bundle_digest[:12], result, detail)
        if result == "refused":  # the refusal goes out in a heartbeat at once
            d.spawn(d._heartbeat(), "edge heartbeat")

    async def apply(self, assignment: Any) -> bool:
        """Download, verify, load, profile and switch; True when the new bundle serves."""
        d = self.daemon
        digest = assignment.bundle_digest
        if d.model is not None and d.model.digest == digest:
            self._report("current", assignment, "already serving it")
            return True
        if digest in self._refused:
            self._report("refused", assignment, self._refused[digest] + " (refused before)")
            return False
        loop = asyncio.get_running_loop()
        try:
            if d.public_key is None:
                raise PermissionDenied("no bundle-signing public key is configured (--public-key "
                                       "or --enroll): refusing an assignment")
            path = await loop.run_in_executor(None, self._download, assignment)
            model = await loop.run_in_executor(None, d._load_model, path)
        except (PermissionDenied, FailedPrecondition) as exc:
            self._refuse(assignment, exc)
            return False
        except TandemError as exc:
            if exc.retryable:
                self._report("failed", assignment, f"download failed, kept serving; trying "
                                                   f"again in {self._retry_s:g} s: {exc}")
                d.spawn(self._retry(assignment, self._retry_s, self._submitted),
                        "edge rollout retry")
                self._retry_s = min(_RETRY_MAX_S, self._retry_s * 2)
                return False
            self._refuse(assignment, exc)
            return False
        if model.digest != digest:
            await loop.run_in_executor(None, model.close)
            self._refuse(assignment, PermissionDenied(
                f"the downloaded bundle is {model.digest[:12]}, not the assigned one"))
            return False
        current = d.model
        if current is not None and current.name == model.name:
            try:
                check_not_older(current.bundle, model.bundle, force=d.config.allow_downgrade)
            except PermissionDenied as exc:
                await loop.run_in_executor(None, model.close)
                self._refuse(assignment, exc)
                return False
        old = current
        d._install(model)
        self._retry_s = _RETRY_MIN_S
        self._write_record(path, old.path if old is not None else None)
        self._report("applied", assignment, f"serving {model.name} "
                                            f"{model.bundle.manifest.model_version}")
        await d._heartbeat()
        if d._advertiser is not None:
            try:
                await loop.run_in_executor(None, d._advertiser.update, d._txt_properties())
            except TandemError as exc:
                log.debug("mDNS update failed: %s", exc)
        if old is not None:
            d.spawn(self._retire(old), "edge retire bundle")
        return True

    async def _retry(self, assignment: Any, delay_s: float, generation: int) -> None:
        await asyncio.sleep(delay_s)
        if self._submitted == generation:  # no newer assignment meanwhile
            self.submit(assignment)

    def _refuse(self, assignment: Any, exc: TandemError) -> None:
        self._refused[assignment.bundle_digest] = str(exc)
        if len(self._refused) > 64:
            self._refused.pop(next(iter(self._refused)))
        self._report("refused", assignment, str(exc))

    def _download(self, assignment: Any) -> Path:
        fetch = self._fetch
        if fetch is None:
            try:
                from tandem.devices.fleet import fetch_bundle
            except ImportError as exc:
                raise MissingDependency(f"rollout needs tandem.devices.fleet ({exc})") from exc
            fetch = fetch_bundle
        self.dir.mkdir(parents=True, exist_ok=True)
        return Path(fetch(assignment, self.dir, self.daemon.public_key))

    async def _retire(self, old: Any) -> None:
        """Close the replaced bundle once its last request ended; keep its files as the
        previous bundle and delete older downloads."""
        d = self.daemon
        if not await old.drained(60.0):
            log.warning("requests still run on the replaced bundle after 60 s; closing it")
        if d.previous is old:
            d.previous = None
        await asyncio.get_running_loop().run_in_executor(None, old.close)
        self._prune()

    def _prune(self) -> None:
        record = self._read_record()
        keep = {Path(p).resolve() for p in (record.get("current"), record.get("previous"))
                if isinstance(p, str)}
        if not self.dir.is_dir():
            return
        for entry in sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime)[:-_KEEP_BUNDLES]:
            if entry.is_dir() and entry.resolve() not in keep and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
