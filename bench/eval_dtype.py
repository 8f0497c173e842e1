"""bfloat16 vs float32 evaluation of one checkpoint, and the host memory of loading it.

    python bench/eval_dtype.py drift     # scores in float32 and bfloat16, side by side
    python bench/eval_dtype.py memory --dtype bfloat16 --mesh data=1,fsdp=8
    # as 2 processes (each reads only its shards) on a checkpoint an earlier run made:
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
        python bench/eval_dtype.py memory --workdir W ... &   (and JAX_PROCESS_ID=1)

drift: a random-init transformers GPT2LMHeadModel (bench/eval_throughput.make_hf_model,
GPT-2 BPE) imported with gptjax.convert, scored twice by `gptjax eval`'s scoring on
HellaSwag and PIQA slices: float32 weights, then the same checkpoint read as bfloat16
(`--dtype bfloat16`). Prints the mean and largest |delta loglikelihood| per request and
each task's accuracies in both dtypes.

memory: the growth of this process's peak RSS while the checkpoint's parameters are
read onto the mesh, against the bytes of this process's shards. On CPU the shards live
in host memory, so the growth includes them.

torch and transformers (drift only) are bench-only extras.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "bench"):  # runnable as `python bench/eval_dtype.py`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
DATA = REPO.parent / "shared" / "data"
TASKS = {"hellaswag": "hellaswag/hellaswag_val_first200.txt", "piqa": "piqa/valid_first200.jsonl"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("drift", "memory"))
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--limit", type=int, default=100, help="questions per task (drift)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    p.add_argument("--dtype", default="bfloat16", help="memory: the dtype read")
    p.add_argument("--mesh", default="data=-1", help="memory: the mesh read onto")
    return p.parse_args(argv)


def checkpoint(args, work: Path) -> Path:
    """The converted random-init GPT-2 (made once per workdir)."""
    ckpt = work / "gptjax"
    if not ckpt.exists():
        from eval_throughput import make_hf_model

        from gptjax.convert import import_hf_gpt2

        import_hf_gpt2(make_hf_model(args, work / "hf"), ckpt)
    return ckpt


def drift(args, ckpt: Path) -> None:
    import numpy as np

    from gptjax.eval import harness, tasks
    from gptjax.eval.scoring import EvalModel

    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = EvalModel.load(ckpt, batch_size=args.batch_size, dtype=dtype)
        for name, rel in TASKS.items():
            task = tasks.resolve_task(f"{name}={args.data / rel}")
            opts = harness.RunOptions(limit=args.limit)
            result, samples = harness.evaluate_task(model, task, 0, opts)
            lls = [ll for s in samples for ll in s["loglikelihoods"]]
            accs = {m: result["metrics"][m]["value"] for m in ("acc", "acc_norm")}
            runs[dtype, name] = (np.asarray(lls), accs)
    for name in TASKS:
        (f32, acc32), (bf16, acc16) = runs["float32", name], runs["bfloat16", name]
        delta = np.abs(bf16 - f32)
        print(
            f"{name}: {len(f32)} requests, mean |ll| {np.mean(np.abs(f32)):.2f}, "
            f"mean |delta ll| {delta.mean():.4f}, max {delta.max():.4f}, "
            f"mean |delta|/|ll| {np.mean(delta / np.abs(f32)):.2e}; "
            f"float32 {acc32}, bfloat16 {acc16}"
        )


def memory(args, ckpt: Path) -> None:
    import jax

    from gptjax.generate import load, read_checkpoint_info
    from gptjax.sharding import make_mesh

    info = read_checkpoint_info(ckpt)
    mesh = make_mesh(args.mesh)
    jax.numpy.zeros(1).block_until_ready()  # the backend up before the baseline

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    before = peak_mib()
    params = load(ckpt, mesh, info, args.dtype).params
    jax.block_until_ready(params)
    mine = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    print(
        f"process {jax.process_index()} of {jax.process_count()}, mesh {dict(mesh.shape)}, "
        f"{args.dtype}: parameters {total / 2**20:.0f} MiB, this process's shards "
        f"{mine / 2**20:.0f} MiB, peak RSS growth while loading {peak_mib() - before:.0f} MiB"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "memory":  # before anything starts JAX's backend
        from gptjax import distributed
        from gptjax.config import DistributedConfig

        if distributed.initialize(DistributedConfig()) and not args.workdir:
            sys.exit("memory as several processes: give a --workdir made by an earlier run")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        ckpt = checkpoint(args, work)
        if args.mode == "drift":
            drift(args, ckpt)
        else:
            memory(args, ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
