"""History checker for the torture workload: the recorded history against etcd's own log.

Ground truth is etcd's watch of the run's prefix (:class:`TruthLog`), replayed into a version
history per key. Every written model value names its writer: a list's last appended value is
``uid * 4 + j``, a slot carries ``tag = uid``. With that, each anomaly class is a direct
comparison (``check``):

* ``G0``            an etcd revision is not exactly the writes of the transactions committed
                    there: a transaction's write missing or altered at its commit revision
                    (non-atomic), a key written there by none of them, two of them writing one
                    key, or writes of transactions of different processes (or unrecorded ones)
                    in one revision. Several transactions of ONE process at one revision are
                    legal: group commit merges queued commits into one etcd Txn when no member
                    writes a key another point-reads or a fence another's query depends on, so
                    each member read exactly the state at C - 1 and none read another's write:
                    they serialize in any order at C. ``group-rw`` and ``G2`` check that.
* ``G1a``           a transaction read a value written by a transaction that failed.
* ``G1b``           a transaction read a list value that never existed in etcd (intermediate).
* ``G1c``           a transaction read a version from its own future (written at or after its
                    commit revision, or after its snapshot).
* ``G-single``      a committed transaction's point read is not the state at commit - 1 (read
                    skew: someone overwrote it before the commit).
* ``G2``            a committed transaction's index query result is not the query re-run over
                    the truth at commit - 1 (phantom / predicate anti-dependency), or another
                    member of its group commit wrote, at the same revision, a key of the queried
                    model whose value before or after matches the query (the merge rule
                    forbids it: that write could change the result).
* ``group-rw``      a member of a group commit point-read a key another member wrote at the
                    same revision (the merge rule forbids it; two crossing ones are write skew).
* ``lost-update``   a committed read-modify-write whose read was overwritten before it
                    committed, or a list version that drops values of the previous version.
* ``lost-write``    an ``ok`` transaction whose writes are not in etcd at its commit revision.
* ``duplicate-append`` / ``duplicate-effect``  a value twice in a list; one transaction's
                    writes applied at two revisions.
* ``failed-effect`` a transaction reported failed whose writes are in etcd.
* ``phantom-write`` a write in etcd no recorded transaction made.
* ``snapshot-mismatch``  a read (read-only snapshot or any transaction's snapshot) differs from
                    the truth at its snapshot revision.
* ``realtime``      T1 completed before T2 was invoked but T2 committed at a lower revision, or
                    a transaction in the same process started from a snapshot older than a
                    commit that already returned there (read-your-writes).

``unknown`` outcomes count as possibly committed: found in the log, they are checked like
``ok`` ones; absent, they are fine.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from txindex.backend.base import Backend, Put, prefix_end
from txindex.errors import TxIndexError, WatchBroken

INTERNAL = "__txindex__/"
MARKER = INTERNAL + "truth-marker"
LIST, SLOT = "lst/", "slot/"


def writer_of(key: str, value: Any) -> int | None:
    """The uid of the transaction that wrote ``value`` under ``key`` (``0`` = setup)."""
    if value is None:
        return None
    if key.startswith(LIST):
        vals = value.get("vals") or []
        return int(vals[-1]) // 4 if vals else 0
    if key.startswith(SLOT):
        return int(value.get("tag", 0))
    return None


# ---- ground truth --------------------------------------------------------------------------


class TruthLog:
    """etcd's history of a prefix, read with a raw watch from ``start`` (the prefix is fresh,
    so nothing under it predates ``start``). :meth:`sync` writes a marker key and reads the
    watch until the marker's event arrives: every earlier revision is then in :attr:`events`.
    Take a sync before any compaction."""

    def __init__(self, backend: Backend, prefix: str, start: int = 1) -> None:
        self.backend = backend
        self.prefix = prefix
        self.next = start
        self.events: list[tuple[int, str, Any]] = []  # (revision, store key, decoded value|None)
        self.raw_errors: list[str] = []

    def sync(self, timeout: float = 60.0) -> int:
        marker = (self.prefix + MARKER).encode()
        deadline = time.monotonic() + timeout
        while True:
            try:
                res = self.backend.txn([], [Put(marker, str(time.time()).encode())])
                target = res.revision
                break
            except TxIndexError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        start = self.prefix.encode()
        end = prefix_end(start)
        while self.next <= target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"truth log stuck at {self.next}, target {target}")
            try:
                stream = self.backend.watch(start, end, self.next)
            except TxIndexError:
                time.sleep(0.2)
                continue
            try:
                while self.next <= target and time.monotonic() < deadline:
                    resp = stream.get(1.0)
                    if resp is None:
                        continue
                    floor = self.next  # events of one revision share it: skip by batch
                    for ev in resp.events:
                        if ev.mod_revision < floor:
                            continue
                        self._add(ev.key, ev.value, ev.mod_revision, ev.deleted)
                        self.next = max(self.next, ev.mod_revision + 1)
            except WatchBroken:
                time.sleep(0.1)
            finally:
                stream.close()
        return target

    def _add(self, key: bytes, value: bytes, rev: int, deleted: bool) -> None:
        skey = key.decode(errors="replace")[len(self.prefix):]
        if skey.startswith(INTERNAL):
            return
        if deleted:
            self.events.append((rev, skey, None))
            return
        try:
            self.events.append((rev, skey, json.loads(value)))
        except ValueError:
            self.raw_errors.append(skey)
            self.events.append((rev, skey, {"__undecodable__": value.decode(errors="replace")}))


# ---- the check -----------------------------------------------------------------------------


@dataclass
class Report:
    anomalies: list[tuple[str, str]] = field(default_factory=list)
    lost: int = 0
    checked_reads: int = 0
    committed: int = 0

    def add(self, cls: str, detail: str) -> None:
        self.anomalies.append((cls, detail))
        if cls in ("lost-write", "lost-update"):
            self.lost += 1

    @property
    def classes(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for cls, _ in self.anomalies:
            out[cls] += 1
        return dict(out)

    def summary(self, limit: int = 8) -> str:
        return "; ".join(f"{c}: {d}" for c, d in self.anomalies[:limit])


class History:
    """Per-key version history replayed from the truth log."""

    def __init__(self, events: Iterable[tuple[int, str, Any]]) -> None:
        self.revs: dict[str, list[int]] = defaultdict(list)
        self.vals: dict[str, list[Any]] = defaultdict(list)
        self.by_rev: dict[int, dict[str, Any]] = defaultdict(dict)
        for rev, key, value in sorted(events, key=lambda e: e[0]):
            self.revs[key].append(rev)
            self.vals[key].append(value)
            self.by_rev[rev][key] = value

    def at(self, key: str, rev: int) -> Any:
        revs = self.revs.get(key)
        if not revs:
            return None
        i = bisect.bisect_right(revs, rev)
        return self.vals[key][i - 1] if i else None

    def versions(self, key: str) -> list[tuple[int, Any]]:
        return list(zip(self.revs.get(key, []), self.vals.get(key, []), strict=True))

    def query(self, model: str, fld: str, value: Any, rev: int, pk: str) -> list[Any]:
        """Every object of ``model`` whose ``fld`` equals ``value`` at ``rev``, by primary key."""
        out = []
        for key in self.revs:
            if key.startswith(model):
                v = self.at(key, rev)
                if v is not None and v.get(fld) == value:
                    out.append(v)
        return sorted(out, key=lambda v: v[pk])


def check(ops: Iterable[dict[str, Any]], events: Iterable[tuple[int, str, Any]]) -> Report:
    """Judge a history (op dicts as recorded by ``tests.torture``) against the truth events."""
    rep = Report()
    hist = History(events)
    by_id: dict[int, dict[str, Any]] = {}
    for op in ops:
        if op["id"] in by_id:
            rep.add("history-error", f"uid {op['id']} recorded twice")
        by_id[op["id"]] = op

    # 1. attribute every etcd revision to its writers (several: one process's group commit)
    applied: dict[int, list[int]] = defaultdict(list)
    for rev in sorted(hist.by_rev):
        writers = {w for k, v in hist.by_rev[rev].items() if (w := writer_of(k, v)) is not None}
        _check_procs(rep, by_id, rev, writers)
        for uid in writers:
            applied[uid].append(rev)
    for key in hist.revs:
        if key.startswith(LIST):
            prev: list[int] = []
            for rev, v in hist.versions(key):
                vals = [] if v is None else list(v.get("vals") or [])
                if len(set(vals)) != len(vals):
                    dup = sorted({x for x in vals if vals.count(x) > 1})
                    rep.add("duplicate-append", f"{key}@{rev} holds {dup} twice")
                if vals[: len(prev)] != prev:
                    rep.add("lost-update", f"{key}@{rev} does not extend the previous version "
                                           f"(lost {sorted(set(prev) - set(vals))[:5]})")
                prev = vals

    for uid, revs in applied.items():
        writer = by_id.get(uid)
        if writer is None:
            if uid != 0:
                rep.add("phantom-write", f"revision {revs} written by unknown transaction {uid}")
            continue
        if len(revs) > 1:
            rep.add("duplicate-effect", f"txn {uid} ({writer['kind']}) applied at revisions {revs}")
        if writer["status"] == "fail":
            rep.add("failed-effect",
                    f"txn {uid} failed ({writer.get('error')}) but is in etcd at {revs}")

    # 2. every acknowledged write is in etcd, with its value, at its commit revision; each
    # revision is exactly the writes of the transactions committed there (a legal group)
    for rev, group in sorted(_commits(rep, hist, by_id, applied).items()):
        _check_group_writes(rep, hist, rev, group)
        _check_group_reads(rep, hist, rev, group)

    # 3. reads: at the snapshot, and (committed writers) at commit - 1
    for op in by_id.values():
        snap = op.get("snap")
        if snap is None or op.get("reads") is None:
            continue
        committed = bool(op.get("writes")) and op.get("commit") is not None and (
            op["status"] == "ok" or (op["status"] == "unknown" and op["id"] in applied))
        _check_reads(rep, hist, by_id, op, snap, "snapshot")
        if committed:
            _check_reads(rep, hist, by_id, op, op["commit"] - 1, "commit")

    # 4. final state: every acknowledged append is in its list
    for op in by_id.values():
        if op["status"] != "ok" or op.get("commit") is None:
            continue
        for key, v in (op.get("writes") or {}).items():
            if key.startswith(LIST) and v is not None:
                final = hist.at(key, 1 << 62) or {}
                if v["vals"][-1] not in (final.get("vals") or []):
                    rep.add("lost-write", f"append {v['vals'][-1]} of txn {op['id']} to {key} "
                                          "is not in the final list")

    _check_realtime(rep, by_id.values())
    return rep


_ABSENT = object()


def _commits(
    rep: Report, hist: History, by_id: dict[int, dict[str, Any]], applied: dict[int, list[int]]
) -> dict[int, list[dict[str, Any]]]:
    """The writing transactions committed at each revision (``ok`` ones found there, ``unknown``
    ones found applied), each checked by :func:`_check_writes`; ``ok`` ones absent: lost."""
    members: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for op in by_id.values():
        writes = op.get("writes") or {}
        if op["status"] == "ok" and writes:
            c = op.get("commit")
            rep.committed += 1
            if c is None or c not in applied.get(op["id"], []):
                rep.add("lost-write", f"txn {op['id']} ok at {c} but its writes are not in etcd "
                                      f"there (found at {applied.get(op['id'], [])})")
                continue
        elif op["status"] == "unknown" and writes and op["id"] in applied:
            op["commit"] = applied[op["id"]][0]  # possibly committed: it did, check it as such
        else:
            continue
        members[op["commit"]].append(op)
        _check_writes(rep, hist, op)
    return members


def _check_procs(
    rep: Report, by_id: dict[int, dict[str, Any]], rev: int, writers: set[int]
) -> None:
    """Several writers at one revision must be recorded transactions of one process."""
    if len(writers) < 2:
        return
    procs = {by_id[u]["proc"] if u in by_id else ("unrecorded", u) for u in writers}
    if len(procs) > 1:
        rep.add("G0", f"revision {rev} mixes writes of transactions {sorted(writers)} of "
                      f"several processes {sorted(map(str, procs))}")


def _check_writes(rep: Report, hist: History, op: dict[str, Any]) -> None:
    """Each write of ``op`` is in etcd at its commit revision with its value (None: deleted)."""
    at = hist.by_rev[op["commit"]]
    bad = sorted(k for k, v in op["writes"].items() if at.get(k, _ABSENT) != v)
    if bad:
        rep.add("G0", f"txn {op['id']} wrote {sorted(op['writes'])} but etcd@{op['commit']} "
                      f"lacks or alters {bad} (non-atomic or altered)")


def _check_group_writes(
    rep: Report, hist: History, rev: int, group: list[dict[str, Any]]
) -> None:
    """The members' write sets are disjoint and cover every key etcd changed at ``rev``
    (deletes too): with :func:`_check_writes`, their union is exactly etcd@rev."""
    owner: dict[str, int] = {}
    for m in group:
        for key in m["writes"]:
            if key in owner:
                rep.add("G0", f"txns {owner[key]} and {m['id']} both wrote {key} at {rev}")
            owner.setdefault(key, m["id"])
    extra = sorted(set(hist.by_rev[rev]) - set(owner))
    if extra:
        rep.add("G0", f"etcd@{rev} holds {extra} that none of the transactions committed there "
                      f"({sorted(m['id'] for m in group)}) wrote")


def _check_group_reads(
    rep: Report, hist: History, rev: int, group: list[dict[str, Any]]
) -> None:
    """No member point-read a key, or ran a query a key could change, another member wrote."""
    if len(group) < 2:
        return
    for m in group:
        others = {k: o["id"] for o in group if o is not m for k in o["writes"]}
        for key in m.get("reads") or {}:
            if key in others:
                rep.add("group-rw", f"txn {m['id']} read {key} that txn {others[key]} of its "
                                    f"group wrote at {rev}")
        for q in m.get("queries") or []:
            for key in sorted(k for k in others if _may_change(hist, k, rev, q)):
                rep.add("G2", f"txn {m['id']} query {q['model']}{q['field']}=={q['value']!r} "
                              f"may be changed by {key} that txn {others[key]} of its group "
                              f"wrote at {rev}")


def _may_change(hist: History, key: str, rev: int, q: dict[str, Any]) -> bool:
    """A write of ``key`` at ``rev`` can change query ``q``: its model, matching before or after."""
    if not key.startswith(q["model"]):
        return False
    vals = (hist.at(key, rev - 1), hist.at(key, rev))
    return any(v is not None and v.get(q["field"]) == q["value"] for v in vals)


def _check_reads(
    rep: Report, hist: History, by_id: dict[int, dict[str, Any]], op: dict[str, Any], rev: int,
    when: str,
) -> None:
    writes = op.get("writes") or {}
    for key, got in (op.get("reads") or {}).items():
        rep.checked_reads += 1
        want = hist.at(key, rev)
        if got == want:
            continue
        cls = _classify(hist, by_id, key, got, rev, op, when)
        if when == "commit" and cls == "stale":
            cls = "lost-update" if key in writes else "G-single"
        elif cls == "stale":
            cls = "snapshot-mismatch"
        rep.add(cls, f"txn {op['id']} ({op['kind']}, {op['status']}) read {key}={_short(got)} "
                     f"but etcd@{rev} ({when}) has {_short(want)}")
    for q in op.get("queries") or []:
        rep.checked_reads += 1
        want = hist.query(q["model"], q["field"], q["value"], rev, q["pk"])
        if q.get("limit") is not None:
            want = want[: q["limit"]]
        if q["result"] == want:
            continue
        cls = "G2" if when == "commit" else "snapshot-mismatch"
        rep.add(cls, f"txn {op['id']} ({op['kind']}, {op['status']}) query {q['model']}"
                     f"{q['field']}=={q['value']!r} got {_short(q['result'])} but etcd@{rev} "
                     f"({when}) gives {_short(want)}")


def _classify(
    hist: History, by_id: dict[int, dict[str, Any]], key: str, got: Any, rev: int,
    op: dict[str, Any], when: str,
) -> str:
    versions = hist.versions(key)
    later = [r for r, v in versions if v == got and r > rev]
    earlier = [r for r, v in versions if v == got and r <= rev]
    if got is not None and not later and not earlier:
        w = writer_of(key, got)
        if w is not None and by_id.get(w, {}).get("status") == "fail":
            return "G1a"
        return "G1b"
    if later and not earlier:
        return "G1c"
    return "stale"


def _short(v: Any, n: int = 120) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_realtime(rep: Report, ops: Iterable[dict[str, Any]]) -> None:
    oks = [o for o in ops if o["status"] == "ok"]
    writers = sorted((o for o in oks if o.get("commit") is not None), key=lambda o: o["t1"])
    ends = [o["t1"] for o in writers]
    best: list[tuple[int, int]] = []  # prefix max of (commit, uid) by completion time
    for o in writers:
        cur = (o["commit"], o["id"])
        best.append(max(best[-1], cur) if best else cur)
    for o in writers:
        i = bisect.bisect_left(ends, o["t0"])
        if i and best[i - 1][0] >= o["commit"]:
            rep.add("realtime", f"txn {o['id']} invoked after txn {best[i - 1][1]} committed at "
                                f"{best[i - 1][0]} but committed at {o['commit']}")
    per_proc: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for o in writers:  # already sorted by completion time
        per_proc[o["proc"]].append(o)
    prefix_max: dict[Any, tuple[list[float], list[tuple[int, int]]]] = {}
    for proc, ws in per_proc.items():
        mx: list[tuple[int, int]] = []
        for w in ws:
            cur = (w["commit"], w["id"])
            mx.append(max(mx[-1], cur) if mx else cur)
        prefix_max[proc] = ([w["t1"] for w in ws], mx)
    for o in oks:
        if o.get("snap") is None or o["proc"] not in prefix_max:
            continue
        t1s, mx = prefix_max[o["proc"]]
        i = bisect.bisect_left(t1s, o["t0"])
        if i and o["snap"] < mx[i - 1][0]:
            rep.add("realtime", f"txn {o['id']} in proc {o['proc']} read snapshot {o['snap']} "
                                f"after txn {mx[i - 1][1]} committed there at {mx[i - 1][0]}")
