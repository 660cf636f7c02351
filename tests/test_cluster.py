"""Faults on a 3-member etcd cluster on loopback, under the multi-process torture workload
(tests/torture.py: 3 client processes, 2 threads each). Each test injects one fault kind, lets
it heal, then requires: zero anomalies and zero lost writes from the history checker, every
worker's cache converged to etcd with indexes equal to a rebuild (its time is reported). The
members' revisions are compared too; etcd 3.5.1 itself may lose a revision on a member killed
under load (etcd #13766, fixed in 3.5.3): that is printed, since it is not txindex's doing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from txindex.server import EtcdCluster

from . import torture


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path_factory.mktemp("cluster"), 3)
    c.start()
    yield c
    c.stop()


def torture_run(cluster: EtcdCluster, tmp_path: Path, fault: str) -> dict[str, Any]:
    s = torture.run(cluster, tmp_path, seed=hash(fault) % 1000, duration=7, faults=[fault],
                    gap=2.0, procs=3, threads=2)
    print(f"{fault}: {s}")
    assert s["fault_log"] and s["fault_log"][0] == fault
    assert s["ok"] > 50, s
    assert s["anomalies"] == 0 and s["lost"] == 0, s["anomaly_examples"]
    assert s["converge_errors"] == [], s["converge_errors"]
    if s["etcd_diverged"]:  # etcd 3.5.1's own bug after a SIGKILL (etcd #13766): reported
        print(f"WARNING etcd members disagree on the revision: {s['member_revisions']}")
    return s


def test_leader_is_found(cluster: EtcdCluster) -> None:
    assert torture.leader_index(cluster) in (0, 1, 2)


def test_sigkill_leader_and_restart(cluster: EtcdCluster, tmp_path: Path) -> None:
    torture_run(cluster, tmp_path, "kill_leader")
    assert all(m.running for m in cluster.members)


def test_sigkill_member_and_restart(cluster: EtcdCluster, tmp_path: Path) -> None:
    torture_run(cluster, tmp_path, "kill_member")


def test_sigstop_beyond_election_timeout(cluster: EtcdCluster, tmp_path: Path) -> None:
    torture_run(cluster, tmp_path, "pause_member")


def test_compaction_while_a_client_lags(cluster: EtcdCluster, tmp_path: Path) -> None:
    torture_run(cluster, tmp_path, "compact_lagging")


def test_client_connection_blackholed(cluster: EtcdCluster, tmp_path: Path) -> None:
    s = torture_run(cluster, tmp_path, "blackhole")
    assert s["unknown"] + s["failed"] >= 0


def test_client_process_killed_mid_commit(cluster: EtcdCluster, tmp_path: Path) -> None:
    s = torture_run(cluster, tmp_path, "kill_client")
    assert s["procs"] >= 4  # victims and their replacements
