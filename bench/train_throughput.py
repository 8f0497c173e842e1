"""Training throughput on this CPU: gptjax vs Hugging Face transformers (PyTorch).

One fixed GPT-2-shaped config, trained for a few steps by both frameworks on the
same random token batches, f32, dropout 0, the same AdamW hyperparameters and
global-norm clipping at 1.0, so each step does the same work: forward, backward,
clip, AdamW update. Prints machine info and a table of tokens/s, step time and MFU
(the same FLOPs per token for both, from gptjax.model.flops_per_token) and the
gptjax/transformers ratio.

    python bench/train_throughput.py                 # the defaults
    python bench/train_throughput.py --vocab 50257 --steps 20

torch and transformers are a bench-only extra (`pip install -e .[reference]`);
they are imported only here. JAX runs on one CPU device: do not set
--xla_force_host_platform_device_count for this script (simulated devices share
the same cores and would only add partitioning overhead).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python bench/train_throughput.py`
    sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (padded to 128)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (after compile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attention-impl",
        default="blocked",
        choices=("blocked", "xla"),
        help="gptjax model.attention_impl (blocked: the CPU choice)",
    )
    p.add_argument(
        "--scan-layers",
        action="store_true",
        help="gptjax model.scan_layers=True (default here: unrolled, the CPU choice for 6 layers)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.1,
        help="a step is 'quiet' when other processes used less than this many CPUs during it",
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=0.0,
        help="host peak FLOP/s for MFU; 0: measured (gptjax.metrics.cpu_peak_flops)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads; 0: the CPUs this process may run on",
    )
    p.add_argument(
        "--torch-adamw",
        choices=("default", "foreach", "fused"),
        default="default",
        help="torch.optim.AdamW implementation (default: torch's own choice)",
    )
    p.add_argument(
        "--attn",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="transformers attn_implementation",
    )
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: gptjax.hostmem.keep_freed_memory() for the whole process (as `gptjax "
        "train` does); default: glibc's defaults",
    )
    p.add_argument("--only", choices=("both", "gptjax", "transformers"), default="both")
    p.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="alternate the frameworks step by step, or run one after the other",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- config


def make_config(args):
    from gptjax.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig

    model = ModelConfig(
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        n_layer=args.layers,
        d_model=args.d_model,
        n_head=args.heads,
        dropout=0.0,
        attn_dropout=0.0,
        param_dtype="float32",
        compute_dtype="float32",
        attention_impl=args.attention_impl,
        scan_layers=args.scan_layers,
    )
    # A constant learning rate (no warmup from 0) so both frameworks apply the same
    # update from the first step; the schedule costs nothing either way.
    optim = OptimConfig(schedule="constant", warmup_steps=0, clip_norm=1.0)
    train = TrainConfig(batch_size=args.batch, steps=args.warmup + args.steps, seed=args.seed)
    return Config(model=model, optim=optim, train=train, mesh=MeshConfig(1, 1, 1))


def token_batches(args, vocab: int) -> np.ndarray:
    """[warmup + steps, B, L+1] int32: the same batches, in the same order, for both."""
    rng = np.random.default_rng(args.seed)
    shape = (args.warmup + args.steps, args.batch, args.seq_len + 1)
    return rng.integers(0, vocab, size=shape, dtype=np.int32)


# ----------------------------------------------------------------------------- gptjax


class GptjaxTrainer:
    """gptjax's own train step (gptjax.train.make_train_step), jitted as train.train does."""

    name = "gptjax"

    def __init__(self, cfg, batches: np.ndarray):
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from gptjax import model, sharding, train
        from gptjax.optim import make_optimizer

        self.jax = jax
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        tx = make_optimizer(cfg.optim, cfg.train.steps)
        self.mesh_ctx = jax.set_mesh(mesh)
        with self.mesh_ctx:
            graphdef, _abstract, sh = train.state_shardings(cfg, mesh, tx)
            self.state = train.init_state(cfg, mesh, tx, sh)
            batch_sh = NamedSharding(mesh, P(None, sharding.RULES["batch"], None))
            step = train.jit_step(train.make_train_step(cfg, graphdef, tx), mesh, sh, batch_sh)
            self.batches = [jax.device_put(b[None], batch_sh) for b in batches]
            # Host copy of the initial weights (the state is donated to the first step).
            self.init_params = jax.device_get(self.state.params)
            self.n_params = model.param_count(self.init_params)
            t0 = time.perf_counter()
            self.step_fn = step.lower(self.state, self.batches[0]).compile()
            self.compile_s = time.perf_counter() - t0

    def step(self, i: int) -> tuple[float, float]:
        """(seconds, loss) of optimizer step i, run to completion."""
        with self.mesh_ctx:
            t0 = time.perf_counter()
            self.state, metrics = self.step_fn(self.state, self.batches[i])
            self.jax.block_until_ready((self.state, metrics))
            dt = time.perf_counter() - t0
        return dt, float(metrics["loss"])


# ----------------------------------------------------------------------------- transformers


def _torch_param_groups(hf_model, weight_decay: float):
    """gptjax's decay mask (gptjax.optim.decay_mask) in torch terms: matrices decay;
    biases, LayerNorm gains and the (tied) token/position embeddings do not."""
    decay, no_decay = [], []
    for name, p in hf_model.named_parameters():  # the tied lm_head appears once, as wte
        is_embedding = name.endswith(("wte.weight", "wpe.weight"))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def load_gptjax_params(hf_model, params: dict) -> None:
    """Copy gptjax parameters (a host pure dict, layers stacked) into GPT2LMHeadModel,
    so both frameworks start from the same weights. GPT-2's Conv1D stores [in, out]."""
    import torch

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    tr, b = hf_model.transformer, params["blocks"]
    d = params["wte"].shape[1]
    with torch.no_grad():
        tr.wte.weight.copy_(t(params["wte"]))
        tr.wpe.weight.copy_(t(params["wpe"]))
        tr.ln_f.weight.copy_(t(params["norm_f"]["scale"]))
        tr.ln_f.bias.copy_(t(params["norm_f"]["bias"]))
        for i, layer in enumerate(tr.h):
            a = {k: v[i] for k, v in b["attn"].items()}
            qkv = [a[k].reshape(d, -1) for k in ("wq", "wk", "wv")]
            layer.attn.c_attn.weight.copy_(t(np.concatenate(qkv, axis=1)))
            bias = [a[k].reshape(-1) for k in ("bq", "bk", "bv")]
            layer.attn.c_attn.bias.copy_(t(np.concatenate(bias)))
            layer.attn.c_proj.weight.copy_(t(a["wo"].reshape(-1, d)))
            layer.attn.c_proj.bias.copy_(t(a["bo"]))
            layer.mlp.c_fc.weight.copy_(t(b["mlp"]["w_in"][i]))
            layer.mlp.c_fc.bias.copy_(t(b["mlp"]["b_in"][i]))
            layer.mlp.c_proj.weight.copy_(t(b["mlp"]["w_out"][i]))
            layer.mlp.c_proj.bias.copy_(t(b["mlp"]["b_out"][i]))
            for ln, norm in ((layer.ln_1, "norm1"), (layer.ln_2, "norm2")):
                ln.weight.copy_(t(b[norm]["scale"][i]))
                ln.bias.copy_(t(b[norm]["bias"][i]))


class TransformersTrainer:
    """GPT2LMHeadModel + torch.optim.AdamW, eager PyTorch, the same step as gptjax's."""

    name = "transformers"

    def __init__(self, cfg, batches: np.ndarray, args, init_params: dict | None):
        import torch
        import torch.nn.functional as F
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        m, o = cfg.model, cfg.optim
        if m.kv_heads != m.n_head or m.head_dim * m.n_head != m.d_model:
            raise SystemExit("GPT-2 has plain multi-head attention with d_head = d_model / n_head")
        torch.manual_seed(cfg.train.seed)
        hf_cfg = GPT2Config(
            vocab_size=m.padded_vocab,  # the same LM-head matmul as gptjax's padded vocabulary
            n_positions=m.seq_len,
            n_embd=m.d_model,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_inner=m.ffn_dim,
            activation_function="gelu_new",  # the tanh GELU, as gptjax
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=m.norm_eps,
            initializer_range=m.init_std,
            tie_word_embeddings=m.tie_embeddings,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = GPT2LMHeadModel._from_config(
            hf_cfg, attn_implementation=args.attn, dtype=torch.float32
        )
        if init_params is not None:
            load_gptjax_params(self.model, init_params)
        self.model.train()
        kwargs = {} if args.torch_adamw == "default" else {args.torch_adamw: True}
        self.opt = torch.optim.AdamW(
            _torch_param_groups(self.model, o.weight_decay),
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=o.eps,
            **kwargs,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.attn = self.model.config._attn_implementation
        self.clip, self.F, self.torch = o.clip_norm, F, torch
        self.batches = [torch.from_numpy(b).long() for b in batches]
        # gptjax masks the logits of the padding rows of the vocabulary (GPT.logits); so
        # does this side, the same elementwise select, so the losses stay identical.
        self.pad_mask = None
        if m.padded_vocab > m.vocab_size:
            self.pad_mask = torch.arange(m.padded_vocab) >= m.vocab_size

    def step(self, i: int) -> tuple[float, float]:
        torch, F = self.torch, self.F
        t0 = time.perf_counter()
        tokens = self.batches[i]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = self.model(input_ids=inputs).logits
        if self.pad_mask is not None:
            logits = logits.masked_fill(self.pad_mask, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        loss = float(loss.detach())  # CPU tensors: the step is complete when it returns
        return time.perf_counter() - t0, loss


# ----------------------------------------------------------------------------- report


def machine_info(threads: int) -> list[str]:
    import jax

    lines = [
        f"date         {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"platform     {platform.platform()}",
        f"cpu          {_cpu_model()}",
        f"cpus         os.cpu_count()={os.cpu_count()}, usable={len(os.sched_getaffinity(0))}",
        f"python       {platform.python_version()}",
        f"jax          {jax.__version__} (jaxlib {_version('jaxlib')}), devices: {jax.devices()}",
        f"flax/optax   {_version('flax')} / {_version('optax')}",
        f"XLA_FLAGS    {os.environ.get('XLA_FLAGS', '') or '(unset)'}",
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)",
    ]
    try:
        import torch
        import transformers

        lines += [
            f"torch        {torch.__version__}, torch.set_num_threads({threads})",
            f"transformers {transformers.__version__}",
        ]
    except ImportError:
        lines.append("torch/transformers not installed (pip install -e .[reference])")
    return lines


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _host_cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole host, CPU-seconds of this process) so far, or None
    where /proc/stat is missing. Their difference over the timed steps is what other
    processes took from the cores the benchmark shares."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    jiffies = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(jiffies) - jiffies[3] - jiffies[4]
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def matmul_rate(frameworks: list[str], n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best achieved f32 GFLOP/s of one [n, n] x [n, n] matmul: a practical ceiling
    to read the MFU figures against."""
    rates = {}
    flops = 2.0 * n**3
    if "gptjax" in frameworks:
        import jax
        import jax.numpy as jnp

        x = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(x).block_until_ready()
        best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(reps))
        rates["jax"] = flops / best / 1e9
    if "transformers" in frameworks:
        import torch

        y = torch.ones((n, n), dtype=torch.float32)
        y @ y
        best = min(_timed(lambda: y @ y) for _ in range(reps))
        rates["torch"] = flops / best / 1e9
    return rates


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def summarize(name: str, times: list[float], tokens_per_step: int, flops_tok: float, peak):
    from gptjax import metrics

    mean, median = statistics.mean(times), statistics.median(times)
    return {
        "name": name,
        "tokens_per_s": tokens_per_step / mean,
        "tokens_per_s_median": tokens_per_step / median,
        "step_ms": 1e3 * mean,
        "step_ms_std": 1e3 * statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "mfu": metrics.mfu(tokens_per_step / mean, flops_tok, peak) or float("nan"),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    # The allocator settings `gptjax train` applies (gptjax/hostmem.py), before either
    # framework starts its threads; process-wide, so both frameworks run under them.
    from gptjax import hostmem

    kept = args.malloc == "keep" and hostmem.keep_freed_memory()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        print(
            "warning: XLA_FLAGS simulates several CPU devices; this bench uses one device and "
            "the simulated ones share its cores. Unset it for a clean measurement.",
            file=sys.stderr,
        )
    threads = args.threads or len(os.sched_getaffinity(0))
    if args.only != "gptjax":
        import torch

        torch.set_num_threads(threads)

    from gptjax import metrics, model

    cfg = make_config(args)
    m = cfg.model
    batches = token_batches(args, m.vocab_size)
    tokens_per_step = args.batch * args.seq_len
    flops_tok = model.flops_per_token(m)
    peak = args.peak_flops or metrics.cpu_peak_flops()

    print("== machine")
    for line in machine_info(threads):
        print("  " + line)
    how = "kept for reuse (gptjax.hostmem)" if kept else "glibc defaults"
    print(f"  malloc: {how}, for both frameworks")
    print("== workload")
    print(
        f"  GPT-2 shape: vocab {m.vocab_size} (padded {m.padded_vocab}), seq_len {m.seq_len}, "
        f"n_layer {m.n_layer}, d_model {m.d_model}, n_head {m.n_head}, d_ff {m.ffn_dim}; "
        f"batch {args.batch} x {m.seq_len} = {tokens_per_step} tokens/step; gptjax "
        f"attention_impl={m.attention_impl}, scan_layers={m.scan_layers}"
    )
    print(
        f"  f32, dropout 0, AdamW(lr {cfg.optim.lr}, betas ({cfg.optim.b1}, {cfg.optim.b2}), "
        f"eps {cfg.optim.eps}, wd {cfg.optim.weight_decay} on matrices), clip_norm "
        f"{cfg.optim.clip_norm}; {args.warmup} warmup + {args.steps} timed steps each, "
        f"{args.order}"
    )
    print(
        f"  {flops_tok / 1e6:.2f} MFLOP/token (gptjax.model.flops_per_token), "
        f"peak {peak / 1e9:.0f} GFLOP/s "
        f"({'--peak-flops' if args.peak_flops else 'measured: gptjax.metrics.cpu_peak_flops'})"
    )
    sys.stdout.flush()

    trainers = []
    init_params = None
    if args.only in ("both", "gptjax"):
        jt = GptjaxTrainer(cfg, batches)
        init_params = jt.init_params
        print(f"  gptjax:       {jt.n_params / 1e6:.2f}M params, compile {jt.compile_s:.1f}s")
        trainers.append(jt)
    if args.only in ("both", "transformers"):
        tt = TransformersTrainer(cfg, batches, args, init_params)
        print(
            f"  transformers: {tt.n_params / 1e6:.2f}M params, attn_implementation {tt.attn}, "
            f"AdamW {args.torch_adamw}"
            + (", initial weights copied from gptjax" if init_params is not None else "")
        )
        trainers.append(tt)
    sys.stdout.flush()

    # Interleaved (default): step i of each framework back to back, so that load from
    # anything else on the host falls on both alike. Sequential: one framework, then
    # the other.
    times = {t.name: [] for t in trainers}
    others = {t.name: [] for t in trainers}  # CPUs used by other processes, per step
    losses = {t.name: [] for t in trainers}
    n = args.warmup + args.steps
    schedule = (
        [(i, t) for i in range(n) for t in trainers]
        if args.order == "interleaved"
        else [(i, t) for t in trainers for i in range(n)]
    )
    load_before = os.getloadavg()
    for i, trainer in schedule:
        before = _host_cpu_seconds()
        dt, loss = trainer.step(i)
        after = _host_cpu_seconds()
        losses[trainer.name].append(loss)
        if i >= args.warmup:
            times[trainer.name].append(dt)
            if before and after:
                other = (after[0] - before[0]) - (after[1] - before[1])
                others[trainer.name].append(max(other, 0.0) / dt)
    load_after = os.getloadavg()

    for t in trainers:
        ls = losses[t.name]
        print(f"  {t.name:<13} loss {ls[0]:.4f} -> {ls[-1]:.4f}")
    if len(trainers) == 2 and init_params is not None:
        diff = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
        print(f"  same weights and batches: max |loss difference| over {n} steps {diff:.2e}")
    print(
        "  load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs"
    )

    all_others = [x for v in others.values() for x in v]
    if all_others:
        print(
            f"  other processes used {statistics.mean(all_others):.2f} of the {os.cpu_count()} "
            "CPUs during the timed steps on average (0 on a quiet host; more: contended)"
        )
    rates = matmul_rate([t.name for t in trainers])
    if rates:
        shown = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        print(f"  f32 2048^3 matmul, best of 5: {shown} GFLOP/s (a practical peak for MFU)")

    print(f"== results, all {args.steps} timed steps (tokens/s and MFU from the mean step time)")
    print_table(trainers, times, tokens_per_step, flops_tok, peak, args.order == "interleaved")
    if all_others:
        # Steps during which nothing else ran on the host: the figures a quiet machine
        # gives. On a shared host these are the ones to compare.
        keep = {
            name: [
                t
                for t, o in zip(times[name], others[name], strict=True)
                if o < args.quiet_threshold
            ]
            for name in times
        }
        pairs = [
            all(others[name][j] < args.quiet_threshold for name in times) for j in range(args.steps)
        ]
        print(
            f"== results, quiet steps only (other processes < {args.quiet_threshold} CPU): "
            + ", ".join(f"{name} {len(v)}/{args.steps}" for name, v in keep.items())
        )
        if all(len(v) == args.steps for v in keep.values()):
            print("  every step was quiet: the figures above stand")
        elif all(len(v) >= 3 for v in keep.values()):
            paired = {
                name: [t for t, q in zip(times[name], pairs, strict=True) if q] for name in times
            }
            print_table(
                trainers,
                keep,
                tokens_per_step,
                flops_tok,
                peak,
                paired=paired if sum(pairs) >= 3 and len(times) == 2 else None,
            )
        else:
            print(
                "  fewer than 3 quiet steps per framework: rerun on a quieter host or with more --steps"
            )


def print_table(trainers, times, tokens_per_step, flops_tok, peak, paired=None):
    """paired: True to take the per-step pairs from `times`, or a dict of the steps to pair."""
    results = [summarize(t.name, times[t.name], tokens_per_step, flops_tok, peak) for t in trainers]
    header = f"  {'framework':<13} {'tokens/s':>9} {'step ms (mean ± sd)':>20} {'median':>8}"
    print(header + f" {'min':>8} {'MFU':>6}")
    for s in results:
        step = f"{s['step_ms']:.0f} ± {s['step_ms_std']:.0f}"
        print(
            f"  {s['name']:<13} {s['tokens_per_s']:>9.0f} {step:>20} {s['step_ms_median']:>8.0f}"
            f" {s['step_ms_min']:>8.0f} {100 * s['mfu']:>5.1f}%"
        )
    if len(results) == 2:
        ratio = results[0]["tokens_per_s"] / results[1]["tokens_per_s"]
        med = results[0]["tokens_per_s_median"] / results[1]["tokens_per_s_median"]
        print(
            f"  ratio gptjax/transformers, tokens/s: {ratio:.2f} (mean), {med:.2f} (median)", end=""
        )
        if paired:
            pairs = times if paired is True else paired
            a, b = pairs["transformers"], pairs["gptjax"]
            ratios = [x / y for x, y in zip(a, b, strict=True)]
            print(f", {statistics.median(ratios):.2f} (median of {len(ratios)} step pairs)", end="")
        print()


if __name__ == "__main__":
    main()
