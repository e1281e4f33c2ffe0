"""Which edit types each anchor gets, decided up front for the whole selection so that the
catalog starts balanced, and seeds derived from (seed, anchor, slot, attempt) so that the same
seed always gives the same rows, whatever the batching or the engine."""

from __future__ import annotations

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
        items = []
        for part in quota.split(","):
            name, sep, n = part.partition("=")
            if not sep:
                raise UltracurateError(f"--quota expects TYPE=N[,TYPE=N...], got '{part}'")
            try:
                items.append((name, int(n)))
            except ValueError:
                raise UltracurateError(f"--quota: '{n}' is not a whole number") from None
    else:
        items = list(quota.items())
    out = {}
    for name, n in items:
        t = parse_types([name])[0]
        if t in out:  # add=1,add=2 (or Add, add): which one was meant is not ours to guess
            raise UltracurateError(f"--quota gives {t} more than once")
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
    larger than n_anchors * per_anchor is cut where the anchors end, and since every type's
    slots are spread over the whole sequence, the cut leaves each type its share of the quota
    to within one.
    """
    if per_anchor < 1:
        raise UltracurateError("--per-anchor must be at least 1")
    return [plan_types_at(k, per_anchor, types, quota) for k in range(n_anchors)]


def plan_types_at(k: int, per_anchor: int, types: list[str],
                  quota: dict[str, int] | None = None) -> list[str]:
    """The types of the k-th anchor of plan_types (from 0). It depends on k alone, not on how
    many anchors there are: a job deals its first anchors without counting the selection, and
    anchors added later leave the earlier deals as they were."""
    if quota is None:
        return [types[(k * per_anchor + j) % len(types)] for j in range(per_anchor)]
    return quota_slice(tuple(sorted(quota.items())), k * per_anchor, (k + 1) * per_anchor)


def quota_slice(quota: tuple[tuple[str, int], ...], start: int, stop: int) -> list[str]:
    """Places [start, stop) of a quota's sequence: every slot i of a type's n at position
    (i + 0.5) / n, in order of position then of EDIT_TYPES. Computed from the slots near
    those places alone (not the whole sequence, which at UltraEdit's 4.1M edits is seconds
    and half a GB): a place p holds a position within (p +- types) / total, each type's
    slots below a position are counted from its n, and only the slots between are sorted."""
    total = sum(n for _, n in quota)
    stop = min(stop, total)
    if start >= stop:
        return []
    order = {t: i for i, t in enumerate(EDIT_TYPES)}
    margin = 2 * len(quota) + 2
    lo, hi = max(0.0, (start - margin) / total), (stop + margin) / total
    below, marks = 0, []
    for t, n in quota:
        if n <= 0:
            continue
        a, b = _slots_below(n, lo), _slots_below(n, hi)
        below += a
        marks += [((i + 0.5) / n, order[t], t) for i in range(a, b)]
    marks.sort()
    if not (below <= start and stop - below <= len(marks)):  # cannot happen: the margin
        raise AssertionError(f"quota_slice({quota}, {start}, {stop}): margin too small")
    return [t for _, _, t in marks[start - below:stop - below]]


def _slots_below(n: int, x: float) -> int:
    """How many of a type's n slots lie below position x: i with (i + 0.5) / n < x, counted
    with the same float division that orders them."""
    i = min(n, max(0, int(x * n - 0.5) - 2))
    while i > 0 and (i - 0.5) / n >= x:
        i -= 1
    while i < n and (i + 0.5) / n < x:
        i += 1
    return i


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one call, from the job's seed and the call's coordinates."""
    h = hashlib.blake2b(":".join(str(p) for p in (seed, *parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") & (2 ** 63 - 1)
