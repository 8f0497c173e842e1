"""Few-shot evaluation of gptjax checkpoints (GPT-3 paper section 2.4).

  example.py          Example: one item as one of four request kinds (mc, loglik, rolling, generate)
  loaders.py          each task file format -> Examples
  definitions.py      user tasks defined as data (JSON/YAML templates over a file's fields)
  tasks.py            the table of built-in tasks; resolve_task (--task NAME=PATH -> Task)
  fewshot.py          seeded K-shot contexts, fitted to n_ctx
  scoring.py          jitted, bucketed, sharded loglikelihood / rolling / greedy scoring
  metrics.py          acc, acc_norm, stderr, perplexities, bits per byte, EM / F1
  harness.py          tasks x shots -> results JSON, table, PNG, samples log
  lm_eval_adapter.py  the "gptjax" model for lm-evaluation-harness (imports lm_eval)

`gptjax eval ...` is `cli_main`. Importing this package imports neither torch,
transformers nor lm_eval (nor jax: everything heavy is imported when used).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["build_parser", "cli_main"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="gptjax eval", description="few-shot evaluation of a gptjax checkpoint"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or training workdir")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME[=PATH]",
        help="a built-in task and its data file (NAME alone: a prepared TFDS dataset), "
        "mc=PATH / lm=PATH for user data, or NAME=DEF.yaml|json (a task as data); repeatable",
    )
    p.add_argument("--shots", default="0", help="comma-separated K values, e.g. 0,1,32")
    p.add_argument(
        "--fewshot-from", action="append", default=[], metavar="NAME=PATH",
        help="draw NAME's demonstrations from this file (default: the training file "
        "beside the data where one exists, else the eval set without the example)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    p.add_argument("--batch-size", type=int, default=32, help="continuations scored per batch")
    p.add_argument("--output", type=Path, default=None, help="results JSON")
    p.add_argument("--log-samples", type=Path, default=None, help="per-example JSONL")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside --output)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    p.add_argument("--max-gen-tokens", type=int, default=64)
    p.add_argument("--mesh", default="-1,1,1", help="DATA,FSDP,TENSOR (-1: the rest)")
    p.add_argument("--tfds-data-dir", default=None)
    return p


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected comma-separated integers") from None
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots {text!r}: expected K >= 0")
    return tuple(dict.fromkeys(shots))


def _devices(sizes: list[int]):
    """All devices, or the first DATA*FSDP*TENSOR of them when no size is -1."""
    import math

    import jax

    return jax.devices() if -1 in sizes else jax.devices()[: max(1, math.prod(sizes))]


def cli_main(argv: list[str] | None = None) -> int:
    """`gptjax eval`: 0 ok, 1 a task failed at run time (others still reported),
    2 bad input (task, data file, checkpoint, arguments)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad arguments, 0 for --help
        return int(e.code or 0)
    from gptjax.eval.tasks import EvalInputError, parse_task_arg, resolve_task

    def bad(msg) -> int:
        print(f"gptjax eval: {msg}", file=sys.stderr)
        return 2

    try:
        shots = _parse_shots(args.shots)
        mesh_sizes = [int(x) for x in args.mesh.split(",")]
        if len(mesh_sizes) != 3:
            raise ValueError(f"--mesh {args.mesh!r}: expected DATA,FSDP,TENSOR")
        fewshot_from = dict(parse_task_arg(x) for x in args.fewshot_from)
        if any(v is None for v in fewshot_from.values()):
            raise ValueError("--fewshot-from expects NAME=PATH")
        task_names = list(dict.fromkeys(parse_task_arg(t)[0] for t in args.task))
        for name in fewshot_from:
            if name not in task_names:  # a misspelling would silently be ignored
                raise ValueError(
                    f"--fewshot-from {name}=...: no --task is named {name!r}; "
                    f"the task names are: {', '.join(task_names)}"
                )
        if args.limit is not None and args.limit <= 0:
            raise ValueError("--limit must be positive")
        if args.batch_size <= 0:
            raise ValueError("--batch-size must be positive")
        # Every task is read and checked before any model work.
        tasks = [resolve_task(t, fewshot_from, args.tfds_data_dir) for t in args.task]
    except (EvalInputError, ValueError) as e:
        return bad(e)

    from gptjax.checkpoint import CheckpointError
    from gptjax.config import MeshConfig
    from gptjax.eval.harness import RunOptions, run
    from gptjax.eval.scoring import EvalModel
    from gptjax.sharding import make_mesh

    try:
        mesh = make_mesh(MeshConfig(*mesh_sizes), _devices(mesh_sizes))
        model = EvalModel.load(args.checkpoint, mesh=mesh, batch_size=args.batch_size)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        return bad(e)
    plot = args.plot or (args.output.with_suffix(".png") if args.output else None)
    opts = RunOptions(
        shots=shots,
        limit=args.limit,
        seed=args.seed,
        max_gen_tokens=args.max_gen_tokens,
        output=args.output,
        samples=args.log_samples,
        plot=plot,
    )
    meta = {"checkpoint": str(args.checkpoint), "mesh": dict(mesh.shape)}
    report = run(model, tasks, opts, meta)
    print(report["table"])
    for path in (args.output, plot, args.log_samples):
        if path:
            print(f"wrote {path}")
    return 1 if any("error" in r for r in report["results"]) else 0
