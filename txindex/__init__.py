"""txindex: transactional in-memory secondary indexes over etcd.

The whole data model lives in memory, kept current by an etcd watch; etcd is the durable,
replicated truth. Reads cost no network; read-write transactions are serializable across
processes, index queries included.
"""

from .db import DB, open
from .errors import (
    AuthError,
    Closed,
    CommitUnknown,
    Compacted,
    Conflict,
    DecodeError,
    DirectoryInUse,
    ModelError,
    RequestRejected,
    SubscriptionLagged,
    TxIndexError,
    TxTooLarge,
    Unavailable,
    UniqueViolation,
    UnorderableValue,
)
from .index import Index
from .metrics import Metrics, PrometheusMetrics  # observability hook (txindex.metrics)
from .model import model
from .notify import Change, Subscription  # db.subscribe (txindex.notify)
from .transaction import Transaction

__all__ = [
    "DB",
    "AuthError",
    "Change",
    "Closed",
    "CommitUnknown",
    "Compacted",
    "Conflict",
    "DecodeError",
    "DirectoryInUse",
    "Index",
    "Metrics",
    "ModelError",
    "PrometheusMetrics",
    "RequestRejected",
    "Subscription",
    "SubscriptionLagged",
    "Transaction",
    "TxIndexError",
    "TxTooLarge",
    "Unavailable",
    "UniqueViolation",
    "UnorderableValue",
    "model",
    "open",
]
__version__ = "0.1.0"
