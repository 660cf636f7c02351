"""A total order over index values.

Python refuses to compare values of different types (``1 < "a"`` raises), and an index may hold
``None`` next to strings, so every index value is *encoded* into a tuple that always compares:

    None < False < True < numbers < str < bytes < tuple

* ``None`` encodes as ``(RANK_NONE, None)``; ``bool`` as ``(RANK_BOOL, b)`` — a bool is never a
  number here, so ``True`` and ``1`` are different index values.
* ``int`` and ``float`` share ``RANK_NUMBER`` and keep their value, so ``1`` and ``1.0`` encode
  equal and order exactly as Python orders them. NaN has no place in an order and is rejected.
* ``str`` orders by code point, ``bytes`` bytewise (Python's own order).
* A tuple encodes elementwise: ``(RANK_TUPLE, tuple(sort_key(x) for x in v))``, so tuples order
  lexicographically and a shorter prefix sorts first.

Anything else (dict, list, set, arbitrary objects, NaN) raises :class:`UnorderableValue`; the
message names the value, and :class:`txindex.index.Index` prefixes it with the model, index and
field. ``TOP`` is a sentinel greater than every encoded value and every primary key, used to build
inclusive upper bounds for bisection; ``BOTTOM`` is less than everything (typed indexes use it for
query values ranked before their type, see :mod:`txindex.index`).
"""

from __future__ import annotations

import math
import sys
from typing import Any, ClassVar, Final, final

from txindex.errors import UnorderableValue

__all__ = [
    "BOTTOM",
    "RANK_BOOL",
    "RANK_BOTTOM",
    "RANK_BYTES",
    "RANK_NONE",
    "RANK_NUMBER",
    "RANK_STR",
    "RANK_TOP",
    "RANK_TUPLE",
    "TOP",
    "rank_of",
    "sort_key",
    "str_successor",
]

RANK_BOTTOM: Final = -1
"""Rank of ``sort_key(BOTTOM)``: before every real value (only meaningful in query bounds)."""
RANK_NONE: Final = 0
RANK_BOOL: Final = 1
RANK_NUMBER: Final = 2
RANK_STR: Final = 3
RANK_BYTES: Final = 4
RANK_TUPLE: Final = 5
RANK_TOP: Final = 6
"""Rank of ``sort_key(TOP)``: after every real value (only meaningful in query bounds)."""

_EXACT_RANK: Final[dict[type, int]] = {
    type(None): RANK_NONE,
    bool: RANK_BOOL,
    int: RANK_NUMBER,
    float: RANK_NUMBER,
    str: RANK_STR,
    bytes: RANK_BYTES,
}

_ALLOWED = "None, bool, int, float (not NaN), str, bytes, or tuples of these"


class _Extreme:
    """A singleton that compares greater (``TOP``) or less (``BOTTOM``) than every other
    object, and equal only to itself."""

    __slots__ = ()
    _above: ClassVar[bool]
    _name: ClassVar[str]
    _hash: ClassVar[int]

    def __new__(cls) -> _Extreme:
        instance = cls.__dict__.get("_instance")
        if instance is None:
            instance = super().__new__(cls)
            setattr(cls, "_instance", instance)  # noqa: B010 - a class attribute, set once
        return instance

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name

    def __eq__(self, other: object) -> bool:
        return other is self

    def __ne__(self, other: object) -> bool:
        return other is not self

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: object) -> bool:
        return not self._above and other is not self

    def __le__(self, other: object) -> bool:
        return other is self or not self._above

    def __gt__(self, other: object) -> bool:
        return self._above and other is not self

    def __ge__(self, other: object) -> bool:
        return other is self or self._above


@final
class _Top(_Extreme):
    """Type of :data:`TOP`: greater than every other object, equal only to itself."""

    __slots__ = ()
    _above = True
    _name = "TOP"
    _hash = 0x7E1A_70B5


TOP: Final = _Top()
"""Compares greater than everything (any str/int primary key, any encoded value) and equal only
to itself. ``(enc, TOP)`` is therefore an upper bound of every ``(enc, pk)`` entry.

``sort_key(TOP) == (RANK_TOP,)``, so ``TOP`` may also appear in a *query* value, e.g. the bound
``("alice", TOP)`` on a compound index lies after every ``("alice", x)`` key."""


@final
class _Bottom(_Extreme):
    """Type of :data:`BOTTOM`: less than every other object, equal only to itself."""

    __slots__ = ()
    _above = False
    _name = "BOTTOM"
    _hash = 0x7E1A_B077


BOTTOM: Final = _Bottom()
"""Compares less than everything and equal only to itself: the query bound an index of one
value type uses for a value ranked before that type (no stored key ever equals it)."""


def rank_of(value: Any) -> int:
    """The rank of ``value`` in the documented order (``sort_key(value)[0]``). O(size)."""
    rank = _EXACT_RANK.get(type(value))
    return rank if rank is not None else int(sort_key(value)[0])


def sort_key(value: Any) -> tuple[Any, ...]:
    """Encode ``value`` into a tuple whose natural order is the documented total order.

    O(n) in the number of scalars inside ``value`` (tuples recurse). Equal values (``1`` and
    ``1.0``) encode to equal, equally hashed keys. Raises :class:`UnorderableValue` (message
    names the offending value and its type) for anything outside the supported types, or NaN.
    """
    t = type(value)
    rank = _EXACT_RANK.get(t)
    if rank is not None:
        if t is float and value != value:
            raise UnorderableValue(f"value {value!r} (NaN) cannot be ordered")
        return (rank, value)
    if t is tuple:
        return (RANK_TUPLE, tuple([sort_key(x) for x in value]))
    return _sort_key_slow(value)


def _sort_key_slow(value: Any) -> tuple[Any, ...]:
    """Subclasses of the supported types (IntEnum, StrEnum, NamedTuple, ...) and ``TOP``."""
    if value is TOP:
        return (RANK_TOP,)
    if value is BOTTOM:
        return (RANK_BOTTOM,)
    if isinstance(value, bool):
        return (RANK_BOOL, bool(value))
    if isinstance(value, int):
        return (RANK_NUMBER, int(value))
    if isinstance(value, float):
        if math.isnan(value):
            raise UnorderableValue(f"value {value!r} (NaN) cannot be ordered")
        return (RANK_NUMBER, float(value))
    if isinstance(value, str):
        return (RANK_STR, str.__str__(value))  # (str, Enum): its value, not "Cls.NAME"
    if isinstance(value, bytes):
        return (RANK_BYTES, bytes(value))
    if isinstance(value, tuple):
        return (RANK_TUPLE, tuple([sort_key(x) for x in value]))
    raise UnorderableValue(
        f"value {value!r} of type {type(value).__name__} cannot be ordered; "
        f"index values must be {_ALLOWED}"
    )


_MAX_CHAR: Final = chr(sys.maxunicode)


def str_successor(s: str) -> str | None:
    """The smallest string greater than every string that starts with ``s``.

    ``None`` when there is no such string (``s`` is empty or made only of U+10FFFF): then every
    string >= ``s`` starts with it. O(len(s)).
    """
    stripped = s.rstrip(_MAX_CHAR)
    if not stripped:
        return None
    return stripped[:-1] + chr(ord(stripped[-1]) + 1)
