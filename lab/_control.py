"""Changing a running ``tandem link run`` from outside: one JSON object per line over TCP
(127.0.0.1 by default), one answer line per request.

Requests (``op``):

* ``{"op": "show"}``
* ``{"op": "set", "profile": "3g"}`` or ``{"op": "set", "changes": {"uplink_bps": "2mbit",
  "delay_ms": 40}}`` (changes on top of the current profile; both may be given)
* ``{"op": "down", "outage_s": 5, "mode": "stall"}`` (``outage_s`` omitted: until ``up``)
* ``{"op": "up"}``

Answer: ``{"ok": true, "state": {...LinkStats...}}`` or ``{"ok": false, "error": "..."}``. A
line over 64 KiB, bad JSON or an unknown op gets an error answer; the connection stays open.
Also the schedule file of ``tandem link run --schedule`` (TOML) is read here.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

from tandem.lab._link import PROFILES, LinkEmulator, LinkProfile, LinkStep
from tandem.lab._loop import Tasks, listen
from tandem.protocol.errors import InvalidArgument, NotFound, TandemError, Unavailable

__all__ = ["ControlServer", "control_request", "load_schedule", "profile_from"]

MAX_LINE = 64 * 1024
_FIELDS = {"uplink_bps", "downlink_bps", "delay_ms", "jitter_ms", "burst_bytes"}


def profile_from(base: LinkProfile, name: str | None = None,
                 changes: dict[str, Any] | None = None) -> LinkProfile:
    """``base``, or the named profile, with ``changes`` applied (unknown keys refused)."""
    if name is not None:
        if not isinstance(name, str) or name not in PROFILES:
            raise InvalidArgument(f"no link profile {name!r} (known: {', '.join(PROFILES)})")
        base = PROFILES[name]
    if not changes:
        return base
    if not isinstance(changes, dict):
        raise InvalidArgument("changes must be an object of profile fields")
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise InvalidArgument(f"unknown profile field(s) {unknown} (known: {sorted(_FIELDS)})")
    try:
        return base.with_changes(**changes)
    except TypeError as exc:  # a wrong type that the dataclass did not check
        raise InvalidArgument(f"bad profile change: {exc}") from None


class ControlServer:
    """Serves the control protocol for ``link`` on ``host:port`` (0: a free port)."""

    def __init__(self, link: LinkEmulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.link = link
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._tasks = Tasks()

    async def start(self) -> ControlServer:
        self._server = await listen(self._accept, self.host, self.port,
                                    what="the link's control port", limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._tasks.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.spawn(self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    writer.write(_answer_error(f"a request line is limited to {MAX_LINE} bytes"))
                    break
                except asyncio.IncompleteReadError:
                    break
                writer.write(self._handle(line))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _handle(self, line: bytes) -> bytes:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _answer_error(f"not JSON: {exc}")
        if not isinstance(request, dict):
            return _answer_error("a request is a JSON object")
        op = request.get("op")
        try:
            if op == "set":
                self.link.set_profile(profile_from(self.link.profile, request.get("profile"),
                                                   request.get("changes")))
            elif op == "down":
                mode = request.get("mode", "stall")
                outage_s = request.get("outage_s")
                if outage_s is None:
                    self.link.set_down(True, mode)
                else:
                    if isinstance(outage_s, bool) or not isinstance(outage_s, int | float):
                        raise InvalidArgument(f"outage_s must be a number, not {outage_s!r}")
                    self.link.outage(outage_s, mode)
            elif op == "up":
                self.link.set_down(False)
            elif op != "show":
                raise InvalidArgument(f"unknown op {op!r} (show, set, down, up)")
        except TandemError as exc:
            return _answer_error(str(exc))
        state = self.link.stats().to_dict()
        return (json.dumps({"ok": True, "state": state}) + "\n").encode()


def _answer_error(message: str) -> bytes:
    return (json.dumps({"ok": False, "error": message}) + "\n").encode()


def control_request(host: str, port: int, request: dict, timeout_s: float = 5.0) -> dict:
    """Send one request to a running link's control port and return its state; an error
    answer raises InvalidArgument, no link there Unavailable."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall((json.dumps(request) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
                if len(buf) > 16 * MAX_LINE:
                    raise Unavailable(f"{host}:{port} answers more than a link's control port")
    except OSError as exc:
        raise Unavailable(f"no link control port at {host}:{port} ({exc.strerror or exc})") \
            from exc
    try:
        answer = json.loads(buf)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Unavailable(f"{host}:{port} is not a link's control port") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise Unavailable(f"{host}:{port} is not a link's control port")
    if not answer["ok"]:
        raise InvalidArgument(str(answer.get("error")))
    return answer["state"]


def load_schedule(path: Path, initial: LinkProfile) -> list[LinkStep]:
    """The steps of a schedule file::

        [[step]]
        at_s = 10
        profile = "3g"            # a named profile ...
        [[step]]
        at_s = 20
        uplink_bps = "500kbit"    # ... and/or fields changed on top of the profile so far
        delay_ms = 100
        [[step]]
        at_s = 30
        outage_s = 5              # down for 5 s ("mode": "stall" or "reset")
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"schedule file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"schedule file {path}: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"schedule file {path}: not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"step"})
    if extra or not isinstance(doc.get("step"), list) or not doc["step"]:
        raise InvalidArgument(f"schedule file {path}: expected [[step]] tables and nothing "
                              "else")
    steps: list[LinkStep] = []
    current = initial
    raw = sorted(doc["step"], key=lambda s: s.get("at_s", 0) if isinstance(s, dict) else 0)
    for i, entry in enumerate(raw):
        where = f"schedule file {path}, step {i + 1}"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}: not a table")
        entry = dict(entry)
        try:
            at_s = entry.pop("at_s")
        except KeyError:
            raise InvalidArgument(f"{where}: at_s is missing") from None
        outage_s = entry.pop("outage_s", None)
        mode = entry.pop("mode", "stall")
        name = entry.pop("profile", None)
        try:
            profile = None
            if name is not None or entry:
                profile = current = profile_from(current, name, entry)
            steps.append(LinkStep(at_s, profile=profile, outage_s=outage_s, mode=mode))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
    return steps

