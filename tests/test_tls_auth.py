"""TLS (CA + client certificate) and etcd authentication (user/password, token renewal), each
against a real etcd: one started with ``--client-cert-auth``, one with auth enabled and simple
tokens that expire after 2 s of disuse. Certificates are made per module with the ``openssl``
CLI (a CA, a server certificate for IP 127.0.0.1, a client certificate; a second, unrelated CA).
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import txindex
from txindex.backend import AuthError, EtcdBackend, Put, open_backend, prefix_end
from txindex.errors import Unavailable
from txindex.server import EtcdServer

from .models import Node

ROOT_PASSWORD = "s3cret-Root-pw"
TOKEN_TTL = 2  # seconds; etcd's simple tokens expire after this long unused


# ---- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here
    other_client: Path  # a client certificate signed by other_ca
    other_client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=txindex test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}-key.pem"


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca[0], "-CAkey", ca[1],
        "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}-key.pem"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca = _make_ca(d, "ca")
    other = _make_ca(d, "other-ca")
    server = _make_leaf(
        d, "server", ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client = _make_leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_client = _make_leaf(d, "other-client", other, "extendedKeyUsage=clientAuth\n")
    return Certs(ca[0], *server, *client, other[0], *other_client)


# ---- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[EtcdServer]:
    """etcd serving clients over TLS only, requiring a client certificate signed by our CA."""
    server = EtcdServer(
        tmp_path_factory.mktemp("etcd-tls"),
        cert_file=certs.server,
        key_file=certs.server_key,
        trusted_ca_file=certs.ca,
        client_cert_auth=True,
        client_cert_file=certs.client,
        client_key_file=certs.client_key,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd with auth enabled (root user) and simple tokens that expire after TOKEN_TTL s."""
    server = EtcdServer(
        tmp_path_factory.mktemp("etcd-auth"),
        extra_args=("--auth-token=simple", f"--auth-token-ttl={TOKEN_TTL}"),
    )
    server.start()
    server.enable_auth(ROOT_PASSWORD)
    yield server
    server.stop()


def _tls_options(certs: Certs) -> dict[str, str]:
    return {"ca_cert": str(certs.ca), "cert_cert": str(certs.client),
            "cert_key": str(certs.client_key)}


def _commit(db: txindex.DB, *nodes: Node) -> int:
    with db.tx() as tx:
        for n in nodes:
            tx.put(n)
        rev = tx.commit()
    assert rev is not None
    return rev


def _let_token_expire() -> None:
    time.sleep(TOKEN_TTL + 1.5)  # etcd checks token TTLs once a second


# ---- TLS ------------------------------------------------------------------------------------


def test_tls_server_refuses_plaintext(tls_server: EtcdServer) -> None:
    assert tls_server.url.startswith("etcds://")
    plain = EtcdBackend([tls_server.endpoint], timeout=1.0)
    try:
        with pytest.raises(Unavailable):
            plain.current_revision()
    finally:
        plain.close()


def test_db_over_tls_with_client_certificate(
    tls_server: EtcdServer, certs: Certs, prefix: str
) -> None:
    with txindex.open(tls_server.url, models=[Node], prefix=prefix, **_tls_options(certs)) as a:
        assert isinstance(a._backend, EtcdBackend) and a._backend.tls
        # etcd:// plus ca_cert means TLS too
        url = f"etcd://{tls_server.endpoint}"
        with txindex.open(url, models=[Node], prefix=prefix, **_tls_options(certs)) as b:
            rev_a = _commit(a, Node("n1", "alice", "10.0.0.1"))
            rev_b = _commit(b, Node("n2", "bob", "10.0.0.2"))
            assert a.wait_for(rev_b, timeout=10) and b.wait_for(rev_a, timeout=10)
            with a.read() as r:
                assert [n.id for n in r.find(Node.by_user, "bob")] == ["n2"]
            with b.read() as r:
                assert r.get(Node, "n1") == Node("n1", "alice", "10.0.0.1")


def test_tls_without_client_certificate_is_refused(tls_server: EtcdServer, certs: Certs) -> None:
    """The server requires a client certificate: trusting its CA is not enough."""
    b = EtcdBackend([tls_server.endpoint], timeout=1.0, ca_cert=str(certs.ca))
    try:
        with pytest.raises(Unavailable):
            b.current_revision()
    finally:
        b.close()


def test_tls_client_certificate_from_another_ca_is_refused(
    tls_server: EtcdServer, certs: Certs
) -> None:
    b = EtcdBackend(
        [tls_server.endpoint], timeout=1.0, ca_cert=str(certs.ca),
        cert_cert=str(certs.other_client), cert_key=str(certs.other_client_key),
    )
    try:
        with pytest.raises(Unavailable):
            b.current_revision()
    finally:
        b.close()


def test_tls_server_certificate_from_untrusted_ca_is_refused(
    tls_server: EtcdServer, certs: Certs
) -> None:
    b = EtcdBackend(
        [tls_server.endpoint], timeout=1.0, ca_cert=str(certs.other_ca),
        cert_cert=str(certs.client), cert_key=str(certs.client_key),
    )
    try:
        with pytest.raises(Unavailable):
            b.current_revision()
    finally:
        b.close()


def test_tls_option_errors(certs: Certs) -> None:
    with pytest.raises(ValueError, match="go together"):
        EtcdBackend(["127.0.0.1:1"], cert_cert=str(certs.client))
    with pytest.raises(ValueError, match="cannot read ca_cert"):
        EtcdBackend(["127.0.0.1:1"], ca_cert=str(certs.ca) + ".missing")
    with pytest.raises(ValueError, match="both user and password"):
        EtcdBackend(["127.0.0.1:1"], user="root")
    # files that gRPC would only fail each handshake on (retried, no file named): at once
    with pytest.raises(ValueError, match="is not a PEM CA certificate"):
        EtcdBackend(["127.0.0.1:1"], ca_cert=str(certs.client_key))
    with pytest.raises(ValueError, match="are not a PEM certificate and its private key"):
        EtcdBackend(["127.0.0.1:1"], cert_cert=str(certs.client), cert_key=str(certs.ca))
    with pytest.raises(ValueError, match="are not a PEM certificate and its private key"):
        EtcdBackend(  # a key that is not the certificate's
            ["127.0.0.1:1"], cert_cert=str(certs.client), cert_key=str(certs.other_client_key)
        )


# ---- auth -----------------------------------------------------------------------------------


def test_auth_required_without_credentials(auth_server: EtcdServer, prefix: str) -> None:
    with pytest.raises(AuthError, match="user name is empty"):
        txindex.open(auth_server.url, models=[Node], prefix=prefix)


def test_db_with_user_and_password(auth_server: EtcdServer, prefix: str) -> None:
    with txindex.open(
        auth_server.url, models=[Node], prefix=prefix, user="root", password=ROOT_PASSWORD
    ) as db:
        _commit(db, Node("n1", "alice", "10.0.0.1"))
        with db.read() as r:
            assert r.get(Node, "n1") == Node("n1", "alice", "10.0.0.1")


def test_user_without_permission_is_refused(auth_server: EtcdServer, prefix: str) -> None:
    """A user with no role may authenticate but not read: a typed error, after one re-auth."""
    from etcd3 import etcdrpc

    root = EtcdBackend([auth_server.endpoint], user="root", password=ROOT_PASSWORD)
    name = f"nobody-{uuid.uuid4().hex[:8]}"
    try:
        md = root._call_metadata(root._token)
        root._endpoints[0].auth.UserAdd(
            etcdrpc.AuthUserAddRequest(name=name, password="nobody-pw"), metadata=md
        )
    finally:
        root.close()
    with pytest.raises(AuthError, match="permission denied") as info:
        txindex.open(auth_server.url, models=[Node], prefix=prefix, user=name,
                     password="nobody-pw")
    assert "nobody-pw" not in str(info.value)


def test_token_expiry_commit_and_watch_keep_working(
    auth_server: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    opts = {"user": "root", "password": ROOT_PASSWORD}
    with txindex.open(auth_server.url, models=[Node], prefix=prefix, **opts) as db:
        backend = db._backend
        assert isinstance(backend, EtcdBackend)
        first_token = backend._token
        assert first_token
        other = open_backend(auth_server.url, **opts)
        try:
            _let_token_expire()
            # commit after expiry: the Txn is refused, re-authenticated and sent again
            before = backend.reauthentications
            _commit(db, Node("n1", "alice", "10.0.0.1"))
            assert backend.reauthentications == before + 1
            assert backend._token != first_token

            # the running watch delivers another client's writes after expiry
            _let_token_expire()
            res = other.txn([], [Put(f"{prefix}nodes/n2".encode(),
                                     b'{"id":"n2","user":"bob","ip":"10.0.0.2"}')])
            assert db.wait_for(res.revision, timeout=10)
            with db.read() as r:
                assert r.get(Node, "n2") is not None

            # a fresh watch created with an expired token: etcd cancels it as "permission
            # denied"; the stream re-authenticates and creates it again, losing nothing
            _let_token_expire()
            before = backend.reauthentications
            nodes = f"{prefix}nodes/".encode()
            stream = backend.watch(nodes, prefix_end(nodes), 1)
            try:
                got = stream.get(timeout=10)
            finally:
                stream.close()
            assert got is not None and [e.key for e in got.events] == [
                f"{prefix}nodes/n1".encode(), f"{prefix}nodes/n2".encode()
            ]
            assert backend.reauthentications == before + 1

            # a restart forgets every token: the watcher reconnects with a stale one and must
            # re-authenticate; commits keep working too
            auth_server.restart()
            res = other.txn([], [Put(f"{prefix}nodes/n3".encode(),
                                     b'{"id":"n3","user":"carol","ip":"10.0.0.3"}')])
            assert db.wait_for(res.revision, timeout=20), db._watcher.stats
            _commit(db, Node("n4", "dave", "10.0.0.4"))
            with db.read() as r:
                assert sorted(n.id for n in r.find(Node.by_user, "carol")) == ["n3"]
                assert r.get(Node, "n4") is not None
            assert db._watcher.stats.reconnects >= 1
            tokens = {first_token, backend._token}
        finally:
            other.close()
    for secret in (*tokens, ROOT_PASSWORD):
        assert secret not in caplog.text


def test_no_secret_in_repr_str_or_errors(
    auth_server: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = EtcdBackend([auth_server.endpoint], user="root", password=ROOT_PASSWORD)
    try:
        token = backend._token
        assert token
        for text in (repr(backend), str(backend), repr(vars(backend).get("_password"))):
            assert ROOT_PASSWORD not in text and token not in text
        assert "user='root'" in repr(backend)
    finally:
        backend.close()

    wrong = "Wr0ng-pa55word"
    with pytest.raises(AuthError) as info:
        txindex.open(auth_server.url, models=[Node], prefix=prefix, user="root", password=wrong)
    err = info.value
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for ex in chain:
        for text in (str(ex), repr(ex)):
            assert wrong not in text and ROOT_PASSWORD not in text and token not in text
    assert "authentication failed" in str(err) and "root" in str(err)
    assert wrong not in caplog.text and token not in caplog.text
