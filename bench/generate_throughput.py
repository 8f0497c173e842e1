"""Generation throughput: gptjax's KV-cache decode loop vs transformers' generate.

Same weights (a random-init GPT2LMHeadModel saved and imported with gptjax convert),
same prompts, greedy decoding of a fixed number of new tokens (no early stop), batch 1
and batch 8, on this CPU. Compile time and one warm-up run are excluded on both sides.

    python bench/generate_throughput.py [--layers 6 --d-model 384 --heads 6 --vocab 50257]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import torch
    import transformers

    from gptjax import config as config_lib
    from gptjax import model
    from gptjax.checkpoint import load_params
    from gptjax.convert import import_hf_gpt2
    from gptjax.generate import Sampling, generate_ids

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_layer=args.layers,
        n_embd=args.d_model,
        n_head=args.heads,
        vocab_size=args.vocab,
        n_positions=args.ctx,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(tmp / "hf")
    import_hf_gpt2(tmp / "hf", tmp / "ckpt")
    cfg_dict, params, _ = load_params(tmp / "ckpt")
    cfg = config_lib.from_dict(cfg_dict).model
    graphdef, _ = model.abstract_model(cfg)
    params = jax.device_put(params)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.platform()}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; {datetime.date.today()}"
    )
    print(
        f"model: GPT-2 {args.layers}x{args.d_model}, {args.heads} heads, vocab {args.vocab}; "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, f32"
    )
    rng = np.random.default_rng(0)
    sampling = Sampling(temperature=0.0, max_new_tokens=args.new_tokens)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'batch':>5} {'gptjax tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} "
        f"{'pair ratio':>11}  (medians of {args.repeats} interleaved runs; pair ratio: "
        "median of the per-repeat ratios)"
    )
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = rng.integers(0, args.vocab, (batch, args.prompt_len)).tolist()

        def run_gptjax(prompts=prompts):
            return generate_ids(graphdef, params, cfg, prompts, sampling)

        def run_hf(prompts=prompts):
            with torch.no_grad():
                return hf.generate(
                    torch.tensor(prompts),
                    attention_mask=torch.ones(len(prompts), args.prompt_len, dtype=torch.long),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=0,
                )

        runs = {"gptjax": [], "hf": []}
        run_gptjax()  # compile / warm up
        run_hf()
        # Interleaved (gptjax, then transformers, per repeat): a shared host's load drifts,
        # and the ratio of neighbouring runs is steadier than either absolute figure.
        for _ in range(args.repeats):
            for name, fn in (("gptjax", run_gptjax), ("hf", run_hf)):
                t0 = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
        new = batch * args.new_tokens
        ours = new / statistics.median(runs["gptjax"])
        theirs = new / statistics.median(runs["hf"])
        pairs = statistics.median(h / g for g, h in zip(runs["gptjax"], runs["hf"], strict=True))
        print(f"{batch:>5} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f} {pairs:>11.2f}")


if __name__ == "__main__":
    main()
