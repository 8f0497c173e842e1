"""The rows of docs/tpu.md: for each GPT-3 size and TPU generation, the smallest slice
where libtpu's compile of the train step fits at the paper's batch (gptjax.tpu.search_tpu).

Each finished row is cached in a JSON file (written atomically after every row), so a
rerun only compiles the rows still missing; `--markdown` prints the table from the cache.
Run it in the background, at low priority: each compile takes ~10-60 s on a 2-core box.

    nice -n 10 python bench/tpu_plans.py --cache bench/tpu_plans.json [--only 175b:v5p]
    python bench/tpu_plans.py --cache bench/tpu_plans.json --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
SIZES = ("small", "medium", "large", "xl", "2_7b", "6_7b", "13b", "175b")
NAMES = {"small": "Small 125M", "medium": "Medium 350M", "large": "Large 760M",
         "xl": "XL 1.3B", "2_7b": "2.7B", "6_7b": "6.7B", "13b": "13B", "175b": "175B"}  # fmt: skip
GENERATIONS = ("v5p", "v5e", "v4", "v6e")


def row(size: str, gen: str, log) -> dict:
    from gptjax import config as config_lib
    from gptjax import model, tpu

    cfg = config_lib.load(str(REPO / "configs" / "gpt3" / f"{size}.py"), [])
    remats = ("full",) if cfg.model.remat == "full" else ("none", "dots_saveable", "full")
    start = time.perf_counter()
    best, tried = tpu.search_tpu(cfg, gen, remats=remats, log=log, flops=False)
    out = {"size": size, "gen": gen, "compiles": len(tried)}
    out["wall_s"] = round(time.perf_counter() - start)
    if best is None:
        return out
    lay = best.layout
    device = tpu.metrics.device_info(
        tpu.topology_devices(f"{gen}:{tpu.GENERATIONS[gen][1][0]}")[0].device_kind
    )
    tokens = best.tokens_per_step
    flops = model.flops_per_token(cfg.model) * tokens
    topo = next(f"{gen}:{s}" for s in tpu.GENERATIONS[gen][1] if tpu.chips(s) == lay.devices)
    out.update(
        topology=topo, chips=lay.devices, mesh=[lay.data, lay.fsdp, lay.tensor],
        remat=best.remat, microbatch=best.microbatch, microbatches=best.microbatches,
        params=best.params, opt_state=best.opt_state, total=best.total, hbm=best.hbm,
        tokens=tokens, notes=list(best.notes),
        step_s={str(m): flops / (lay.devices * device.peak_flops * m) for m in (0.4, 0.55)},
        command=" ".join([
            f"gptjax plan --config configs/gpt3/{size}.py --tpu {topo}",
            f"--mesh data={lay.data},fsdp={lay.fsdp},tensor={lay.tensor}",
            *(o for o in best.overrides(cfg) if not o.startswith("--config.mesh.")),
        ]),
    )  # fmt: skip
    return out


def markdown(rows: dict) -> str:
    gib = 2**30
    lines = [
        "| size | TPU | slice (chips) | mesh (data,fsdp,tensor) | remat | microbatch x count "
        "| params + optimizer | total / HBM per chip | step @ 40% / 55% MFU | tokens/s @ 40% / 55% "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        for gen in GENERATIONS:
            r = rows.get(f"{size}:{gen}")
            if r is None:
                lines.append(f"| {NAMES[size]} | {gen} | not computed | | | | | | | | |")
                continue
            if "topology" not in r:
                lines.append(f"| {NAMES[size]} | {gen} | nothing fits | | | | | | | | |")
                continue
            s40, s55 = r["step_s"]["0.4"], r["step_s"]["0.55"]
            lines.append(
                f"| {NAMES[size]} | {gen} | {r['topology']} ({r['chips']}) | "
                f"{','.join(map(str, r['mesh']))} | {r['remat']} | "
                f"{r['microbatch']} x {r['microbatches']} | "
                f"{(r['params'] + r['opt_state']) / gib:.2f} GiB | "
                f"**{r['total'] / gib:.1f}** / {r['hbm'] / gib:.0f} GiB | "
                f"{s40:.3g} s / {s55:.3g} s | "
                f"{r['tokens'] / s40:,.0f} / {r['tokens'] / s55:,.0f} | `{r['command']}` |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="JSON file of finished rows")
    ap.add_argument("--only", nargs="*", help="rows SIZE:GEN to compute, in this order")
    ap.add_argument("--markdown", action="store_true", help="print the table from the cache")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    cache = Path(args.cache)
    rows = json.loads(cache.read_text()) if cache.exists() else {}
    if args.markdown:
        print(markdown(rows))
        return 0
    # v5p first (every size), then 175B on the others, then the rest; 175B on v5p last:
    # `gptjax plan --config configs/gpt3/175b.py --tpu v5p:8x8x16 --search` gives it.
    todo = args.only or sorted(
        (f"{s}:{g}" for g in GENERATIONS for s in SIZES),
        key=lambda k: (k == "175b:v5p", not k.endswith(":v5p"), not k.startswith("175b")),
    )
    for key in todo:
        if key in rows:
            continue
        size, gen = key.split(":")
        print(f"== {key}", flush=True)
        rows[key] = row(size, gen, lambda line: print(line, flush=True))
        print(json.dumps(rows[key]), flush=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
