"""Which edit types each anchor gets, decided up front for the whole selection so that the
catalog starts balanced, and seeds derived from (seed, anchor, slot, attempt) so that the same
seed always gives the same rows, whatever the batching or the engine."""

from __future__ import annotations

import functools
import hashlib

from ..names import EDIT_TYPES
from ..errors import UltracurateError


def parse_types(types: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if types is None or types == "all" or types == ["all"]:
        return list(EDIT_TYPES)
    if isinstance(types, str):
        types = [t for t in types.split(",") if t.strip()]
    out = []
    for t in types:
        t = t.strip().lower().replace("-", "_")
        if t not in EDIT_TYPES:
            raise UltracurateError(f"unknown edit type '{t}' (one of {', '.join(EDIT_TYPES)})")
        if t not in out:
            out.append(t)
    if not out:
        raise UltracurateError("no edit types given")
    return out


def parse_quota(quota: str | dict | None) -> dict[str, int] | None:
    """'add=3,replace=5' (or a dict) -> {'add': 3, 'replace': 5}."""
    if quota is None or quota == "":
        return None
    if isinstance(quota, str):
        items = {}
        for part in quota.split(","):
            name, sep, n = part.partition("=")
            if not sep:
                raise UltracurateError(f"--quota expects TYPE=N[,TYPE=N...], got '{part}'")
            try:
                items[name] = int(n)
            except ValueError:
                raise UltracurateError(f"--quota: '{n}' is not a whole number") from None
        quota = items
    out = {}
    for name, n in quota.items():
        t = parse_types([name])[0]
        if int(n) < 0:
            raise UltracurateError(f"--quota: {t} is negative")
        out[t] = int(n)
    return out


def plan_types(n_anchors: int, per_anchor: int, types: list[str],
               quota: dict[str, int] | None = None) -> list[list[str]]:
    """Edit types for each of n_anchors anchors (in id order), at most per_anchor each.

    Without a quota the types are dealt round-robin, so every type gets the same count to
    within one. With a quota ({type: total}) each type's slots are spread evenly over the
    sequence (slot i of n at position (i + 0.5) / n) and dealt out in that order; a quota
    larger than n_anchors * per_anchor is cut evenly across types.
    """
    if per_anchor < 1:
        raise UltracurateError("--per-anchor must be at least 1")
    capacity = n_anchors * per_anchor
    if quota is None:
        seq = [types[i % len(types)] for i in range(capacity)]
    else:
        seq = list(_quota_sequence(capacity, tuple(sorted(quota.items()))))
    return [seq[k * per_anchor:(k + 1) * per_anchor] for k in range(n_anchors)]


def plan_types_at(k: int, n_anchors: int, per_anchor: int, types: list[str],
                  quota: dict[str, int] | None = None) -> list[str]:
    """plan_types(n_anchors, per_anchor, types, quota)[k], without dealing the others (the
    sequence a quota gives is computed once per plan)."""
    if quota is None:
        return [types[(k * per_anchor + j) % len(types)] for j in range(per_anchor)]
    seq = _quota_sequence(n_anchors * per_anchor, tuple(sorted(quota.items())))
    return list(seq[k * per_anchor:(k + 1) * per_anchor])


@functools.lru_cache(maxsize=4)
def _quota_sequence(capacity: int, quota: tuple) -> tuple[str, ...]:
    fitted = _fit(dict(quota), capacity)
    order = {t: i for i, t in enumerate(EDIT_TYPES)}
    marks = [((i + 0.5) / n, order[t], t) for t, n in fitted.items() for i in range(n)]
    return tuple(t for _, _, t in sorted(marks))


def _fit(quota: dict[str, int], capacity: int) -> dict[str, int]:
    """Scale a quota down to capacity, in proportion (largest remainders get the rest)."""
    total = sum(quota.values())
    if total <= capacity:
        return quota
    exact = {t: n * capacity / total for t, n in quota.items()}
    out = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: out[t] - exact[t])[:capacity - sum(out.values())]:
        out[t] += 1
    return out


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one call, from the job's seed and the call's coordinates."""
    h = hashlib.blake2b(":".join(str(p) for p in (seed, *parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") & (2 ** 63 - 1)
