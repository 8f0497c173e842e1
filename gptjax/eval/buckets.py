"""Padded shapes for scoring: a few buckets, since on a first run compiling each
distinct shape (seconds) costs more than the padding it saves (milliseconds a batch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


def length_bucket(n: int, minimum: int = 8) -> int:
    """Smallest of 8, 16, 24, 32, 48, 64, 96, 128, 192, ... that holds n (powers of two,
    and 1.5x steps from 16 on: continuations of 17-64 tokens, common in multiple-choice
    tasks, would otherwise carry up to 50% padding through the whole model)."""
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2 and size >= 16:
            return size * 3 // 2
        size *= 2


def row_bucket(n: int, multiple: int = 1) -> int:
    """Next power of two >= n, rounded up to a multiple of `multiple` (batch shards)."""
    size = 1 << max(n - 1, 0).bit_length()
    return -(-size // multiple) * multiple


def fit_shapes(
    needs: Sequence[tuple[int, ...]],
    known: Iterable[tuple[int, ...]] = (),
    *,
    compile_cost: float = 0.0,
    max_new: int = 8,
) -> list[tuple[int, ...]]:
    """The shape each batch runs at, given the shape it needs, (rows, lengths...): at
    least as large in every dimension. The cost of running a batch at a shape is its
    padded tokens, rows x the sum of its lengths; compiling a shape not in `known` (those
    already compiled) costs `compile_cost` such tokens. Greedy: while some merge of a new
    shape into another (or both into their maximum) adds fewer padded tokens than the
    compile it saves, or there are more than `max_new` new shapes, the cheapest is made."""

    def cost(s):
        return s[0] * sum(s[1:])

    known = set(known)
    count = Counter(needs)
    at = {need: need for need in count}  # need -> the shape it runs at
    while True:
        fresh = sorted({s for s in at.values() if s not in known})
        if not fresh:
            break
        users: dict = {}
        for need, s in at.items():
            users.setdefault(s, []).append(need)
        best = None
        for a in fresh:
            for b in sorted(set(at.values()) | known):
                m = tuple(max(x, y) for x, y in zip(a, b, strict=True))
                if a == b or (m != b and b in known):
                    continue  # a known shape does not grow
                moved = users[a] + (users.get(b, []) if m != b else [])
                added = sum(count[n] * (cost(m) - cost(at[n])) for n in moved)
                if best is None or added < best[0]:
                    best = (added, moved, m)
        if best is None or (best[0] > compile_cost and len(fresh) <= max_new):
            break
        for n in best[1]:
            at[n] = best[2]
    return [at[n] for n in needs]
