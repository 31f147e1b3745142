"""A real mosquitto broker for tests and benchmarks.

:class:`Mosquitto` writes a config into its own directory, starts the broker on 127.0.0.1 and a
free port, and waits until the port accepts connections (polling the socket, never a fixed
sleep). It can be killed and started again on the *same* port, which the reconnect tests need.

    with Mosquitto(tmp_path, max_packet_size=1 << 20) as broker:
        ... broker.port ...
        broker.kill()      # SIGKILL, like a crash
        broker.start()     # same port, same config

Nothing here imports paho or Tandem: the helper only runs the broker process.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BrokerError",
    "Mosquitto",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "mosquitto_binary",
    "mosquitto_passwd_binary",
]


class BrokerError(RuntimeError):
    """The broker process would not start, or would not listen in time."""


def mosquitto_binary() -> str | None:
    """Path of the mosquitto executable (PATH first, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_passwd_binary() -> str | None:
    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    for candidate in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path  # server certificate (CN=localhost, SAN 127.0.0.1 + localhost)
    key_file: Path
    client_cert_file: Path  # a client certificate signed by the same CA
    client_key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("tandem-test-ca"))
        .issuer_name(name("tandem-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    files = TlsFiles(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
        client_cert_file=directory / "client.pem",
        client_key_file=directory / "client.key",
    )
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key, server_cert = leaf("localhost", server=True)
    files.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, files.key_file)
    client_key, client_cert = leaf("tandem-test-client", server=False)
    files.client_cert_file.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_key(client_key, files.client_key_file)
    return files


class Mosquitto:
    """One mosquitto process with its own config, log and (optional) persistence directory.

    ``users`` ({name: password}) writes a password file with ``mosquitto_passwd`` and turns
    anonymous access off. ``tls=True`` adds a TLS listener on :attr:`tls_port` with certificates
    made by :func:`make_tls_files` (see :attr:`tls_files`). ``tcp_nodelay=False`` leaves Nagle's
    algorithm on the broker's sockets (mosquitto's default, which makes every small round trip
    ~40 ms: only for tests of that).
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_packet_size: int | None = None,
        persistence: bool = False,
        users: dict[str, str] | None = None,
        tls: bool = False,
        extra_config: str = "",
        start_timeout_s: float = 10.0,
        tcp_nodelay: bool = True,
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto binary not found (PATH, /usr/sbin)")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.tls_port: int | None = free_port(host) if tls else None
        self.tls_files: TlsFiles | None = make_tls_files(self.directory / "tls") if tls else None
        self.start_timeout_s = start_timeout_s
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.config_path.write_text(self._config(
            max_packet_size=max_packet_size,
            persistence=persistence,
            users=users,
            extra_config=extra_config,
            tcp_nodelay=tcp_nodelay,
        ))

    # -- config ------------------------------------------------------------------------------

    def _config(self, *, max_packet_size, persistence, users, extra_config,
                tcp_nodelay=True) -> str:
        lines = [
            "per_listener_settings false",
            f"allow_anonymous {'false' if users else 'true'}",
            f"set_tcp_nodelay {'true' if tcp_nodelay else 'false'}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # as root mosquitto drops to user "mosquitto", which cannot read our 0700 tmp dirs
            lines.append("user root")
        if max_packet_size is not None:
            lines.append(f"max_packet_size {int(max_packet_size)}")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.directory}/"]
        else:
            lines.append("persistence false")
        if users:
            passwd = mosquitto_passwd_binary()
            if passwd is None:
                raise BrokerError("mosquitto_passwd not found: cannot write a password file")
            pw_file = self.directory / "passwords"
            pw_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            pw_file.chmod(0o600)
            subprocess.run([passwd, "-U", str(pw_file)], check=True, capture_output=True,
                           timeout=10)
            lines.append(f"password_file {pw_file}")
        lines.append(f"listener {self.port} {self.host}")
        if self.tls_files is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_files.ca_file}",
                f"certfile {self.tls_files.cert_file}",
                f"keyfile {self.tls_files.key_file}",
            ]
        if extra_config:
            lines.append(extra_config)
        return "\n".join(lines) + "\n"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> Mosquitto:
        """Start (or restart, on the same ports) and wait until every listener accepts."""
        if self.running:
            raise BrokerError("mosquitto is already running")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(ports)
        while pending:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._reap()
                raise BrokerError(f"mosquitto exited with {rc} while starting:\n{self.log_tail()}")
            if _port_open(self.host, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"mosquitto did not listen on {self.host}:{pending[0]} within "
                    f"{self.start_timeout_s}s:\n{self.log_tail()}"
                )
            time.sleep(0.01)  # polling interval of the readiness probe
        return self

    def kill(self) -> None:
        """SIGKILL: the broker vanishes as in a crash (no DISCONNECT, no persistence save)."""
        self._signal_and_wait(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown); SIGKILL if it does not exit in 5 s."""
        self._signal_and_wait(signal.SIGTERM)

    def _signal_and_wait(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._reap()

    def _reap(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None

    def log_text(self) -> str:
        """Everything the broker logged so far ("" when there is no log yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> Mosquitto:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"Mosquitto({self.host}:{self.port}, {state})"
