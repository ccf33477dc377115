"""Where two nested dicts (specs, configs) differ, leaf by leaf, named by dotted keys: the one comparison behind a
store's fingerprint check, a run's resume check, the ablation skip rule and the report's "config vs latest"."""
from __future__ import annotations

from typing import Any


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()  # the value on the side that lacks a key


def nested_differences(old: Any, new: Any, ignore: tuple[str, ...] = (), prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf where `old` and `new` differ, recursing into dicts that
    both sides hold; a key only one side has gives ABSENT on the other. Dotted keys in `ignore` are skipped.
    Keys come in `new`'s order, then those only `old` has."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [(prefix, old, new)]
    out = []
    for key in [*new, *(k for k in old if k not in new)]:
        name = f"{prefix}.{key}" if prefix else str(key)
        if name not in ignore:
            out += nested_differences(old.get(key, ABSENT), new.get(key, ABSENT), ignore, name)
    return out
