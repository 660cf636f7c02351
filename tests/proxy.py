"""A fault-injecting loopback TCP proxy: stall ("freeze"), drop ("cut") or swallow the replies
of ("hold_replies") a client's traffic to etcd without touching txindex code."""

from __future__ import annotations

import contextlib
import socket
import threading


class Proxy:
    """Forwards 127.0.0.1:port to ``upstream`` with one thread per direction per connection.

    ``freeze()`` stops forwarding (bytes are held, connections stay open), ``thaw()`` resumes,
    ``cut()`` closes every open connection (held bytes are dropped); new connections are
    accepted throughout (while frozen they carry nothing until ``thaw()``)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()  # both directions
        self._flowing.set()
        self._replies = threading.Event()  # server -> client only
        self._replies.set()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._closed = False
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream, timeout=2.0)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._socks |= {client, server}
                self.accepted += 1
            for src, dst, gates in (
                (client, server, (self._flowing,)),
                (server, client, (self._flowing, self._replies)),
            ):
                threading.Thread(target=self._pump, args=(src, dst, gates), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, gates: tuple[threading.Event, ...]
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                for gate in gates:
                    gate.wait()
                with self._lock:
                    alive = src in self._socks and dst in self._socks
                if not alive:  # cut while the bytes were held: drop them
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._socks.discard(s)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def freeze(self) -> None:
        self._flowing.clear()

    def hold_replies(self) -> None:
        """Requests still reach the server; its replies are held (until cut or thaw)."""
        self._replies.clear()

    def thaw(self) -> None:
        self._flowing.set()
        self._replies.set()

    def cut(self) -> None:
        with self._lock:
            socks = list(self._socks)
        self._drop(*socks)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
        self.thaw()
        self._thread.join(timeout=2)
