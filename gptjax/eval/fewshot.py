"""K-shot contexts (GPT-3 section 2.4): K solved examples drawn at random, with a fixed
seed, from the task's training split (or the eval set itself, never the example being
scored), each followed by the example's fewshot_delimiter ("\\n\\n" unless the task says
otherwise), after the task's description (usually none), then the example's own context.

When K demonstrations do not fit in the model's context, the largest K that fits is used
for that example and recorded; a K larger than the pool is clamped with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence

from gptjax.eval.tasks import Example

log = logging.getLogger(__name__)

FEWSHOT_DELIMITER = "\n\n"


@dataclasses.dataclass(frozen=True)
class Shot:
    """An example with its few-shot prefix applied, and how many demos it got."""

    example: Example
    k: int
    demo_ids: tuple[str, ...] = ()


def draw(
    index: int, example: Example, pool: Sequence[Example], k: int, seed: int, same_pool: bool
) -> list[Example]:
    """K demos for one example: a per-example seeded draw, so the result does not depend
    on --limit or on the order examples are scored in. The example itself (same index
    when the pool is the eval set; same demo text otherwise) is never drawn."""
    if k <= 0 or not pool:
        return []
    rng = random.Random(f"{seed}:{index}")
    own = example.demo() if example.kind != "rolling" else None
    chosen: list[Example] = []
    seen: set[int] = set()
    want = min(k, len(pool) - (1 if same_pool else 0))
    # Rejection sampling: O(k) per example however large the pool.
    while len(chosen) < want and len(seen) < len(pool):
        j = rng.randrange(len(pool))
        if j in seen:
            continue
        seen.add(j)
        if same_pool and (j == index or pool[j].doc_id == example.doc_id):
            continue
        if not same_pool and pool[j].demo() == own:
            continue
        chosen.append(pool[j])
    return chosen


def build(
    examples: Sequence[Example],
    k: int,
    *,
    pool: Sequence[Example] | None,
    seed: int,
    fits: Callable[[Example], bool],
    name: str = "",
    pool_is_eval_set: bool | None = None,
) -> list[Shot]:
    """Each example with a K-shot prefix; `fits(example)` says whether it fits n_ctx.
    pool None: the eval examples themselves. pool_is_eval_set: the pool is the whole
    eval set of which `examples` is a prefix (--limit), so draws do not depend on it."""
    same_pool = pool is None if pool_is_eval_set is None else pool_is_eval_set
    pool = list(examples) if pool is None else list(pool)
    if k and examples and examples[0].kind == "rolling":
        log.info("%s: perplexity tasks take no demonstrations; K=%d ignored", name, k)
        k = 0
    available = len(pool) - (1 if same_pool else 0)
    if k > available:
        log.warning(
            "%s: K=%d is larger than the few-shot pool (%d examples); using K=%d",
            name, k, available, available,
        )  # fmt: skip
        k = max(available, 0)
    shots = []
    for i, ex in enumerate(examples):
        demos = draw(i, ex, pool, k, seed, same_pool)
        n = len(demos)
        while True:
            delimiter = ex.fewshot_delimiter
            prefix = ex.description + "".join(d.demo() + delimiter for d in demos[:n])
            shot = ex.with_prefix(prefix)
            if n == 0 or fits(shot):
                break
            n -= 1
        shots.append(Shot(shot, n, tuple(d.doc_id for d in demos[:n])))
    return shots
