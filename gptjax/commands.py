"""What each `gptjax` command does, once gptjax/cli.py has parsed its arguments: one
function per command, each importing the modules it needs when it runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run_job(job, user_errors: tuple[type[Exception], ...]) -> tuple[int, object]:
    """(exit status, result) of a training job (train, finetune), which may be one
    process of several: a user error (bad data, checkpoint, config) exits 2, a non-finite
    loss 3, preemption 143. With several processes a failing one leaves at once instead
    of waiting for the others at exit (see gptjax.distributed.exit_now)."""
    import signal

    from gptjax import distributed
    from gptjax.checkpoint import CheckpointWriteError
    from gptjax.loop import NonFiniteLoss, Preempted

    def stop(_signum, _frame):
        """SIGTERM while the loop (which takes it over, to save) does not run. SystemExit,
        which no `except Exception` on the way (data preparation's) turns into another
        error; `finally` blocks still run (the workdir lock is released)."""
        print("gptjax: SIGTERM outside the training steps (preparing data, compiling or "
              "finishing): stopped, nothing new saved; re-run to resume",
              file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(143)

    previous = None
    if not distributed.is_multiprocess():  # several: JAX's preemption service has it
        try:
            previous = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread
            pass
    try:
        return 0, job()
    except user_errors as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return distributed.leave(2), None  # perhaps this process alone: do not wait
    except NonFiniteLoss as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 3, None
    except CheckpointWriteError as e:
        # Leave at once: Orbax's failed background threads would print at interpreter exit.
        print(f"gptjax: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except Preempted as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 143, None
    except Exception as e:
        if distributed.is_multiprocess():  # do not wait for the others at exit: they are stuck
            distributed.exit_now(e)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def train_command(args, overrides) -> int:
    from gptjax import config as config_lib
    from gptjax import distributed

    try:
        cfg = config_lib.load(args.config, overrides)
        # Before anything touches a JAX backend: one process of several, or alone.
        distributed.initialize(cfg.distributed)
    except config_lib.ConfigError as e:
        print(f"gptjax: config error: {e}", file=sys.stderr)
        return 2
    from gptjax import train
    from gptjax.checkpoint import CheckpointError
    from gptjax.data import DataError
    from gptjax.workdir import WorkdirError

    user_errors = (config_lib.ConfigError, DataError, CheckpointError, WorkdirError)
    return run_job(lambda: train.train(cfg, args.workdir), user_errors)[0]


def tokenizer_train_command(args, _overrides) -> int:
    from gptjax.data import DataError
    from gptjax.tokenizer import train_sentencepiece

    missing = [p for p in args.input if not Path(p).is_file()]
    if missing:
        print(f"gptjax: input file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        out = train_sentencepiece([Path(p) for p in args.input], args.vocab_size, args.output)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def data_prepare_command(args, overrides) -> int:
    from gptjax import config as config_lib
    from gptjax.data import DataError
    from gptjax.data.beam import BeamMissing
    from gptjax.data.prepare import prepare

    try:
        cfg = config_lib.load(args.config, overrides)
        if args.workers is not None and args.workers < 1:
            raise DataError(f"--workers must be >= 1, got {args.workers}")
        manifest = prepare(
            cfg, args.output, args.workers, args.runner, args.beam_options, args.shard_mb
        )
    except (config_lib.ConfigError, DataError, BeamMissing) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(
        f"{args.output}: {manifest['documents']} documents, {manifest['tokens']} tokens in "
        f"{len(manifest['shards'])} shards, stream sha256 {manifest['stream_sha256']}"
    )
    return 0


def generate_command(args, _overrides) -> int:
    from gptjax.checkpoint import CheckpointError
    from gptjax.generate import Sampling, from_checkpoint
    from gptjax.sharding import make_mesh

    if bool(args.prompt) == bool(args.prompt_ids):
        print("gptjax: give --prompt (text) or --prompt-ids (ids), one of them", file=sys.stderr)
        return 2
    try:
        prompt_ids = []
        for p in args.prompt_ids or []:
            try:
                prompt_ids.append([int(t) for t in p.split(",") if t.strip()])
            except ValueError:
                raise ValueError(f"--prompt-ids {p!r}: expected comma-separated integers") from None
        sampling = Sampling(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            stop_ids=tuple(args.stop_id or ()),
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
        )
        mesh = make_mesh(args.mesh) if args.mesh else None
        new, texts = from_checkpoint(
            args.checkpoint,
            args.prompt or [],
            prompt_ids,
            sampling,
            args.seed,
            args.stop or [],
            mesh=mesh,
            need_text=args.format == "text",
        )
    except (CheckpointError, ValueError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    if args.format == "ids":
        for ids in new:
            print(",".join(map(str, ids)))
    else:  # the prompt and its continuation; for --prompt-ids the new text alone
        for prompt, text in zip(args.prompt or [""] * len(texts), texts, strict=True):
            print(prompt + text)
    return 0


def convert_command(args, _overrides) -> int:
    from gptjax.checkpoint import CheckpointError
    from gptjax.convert import ConvertError, convert

    try:
        out = convert(
            args.from_format, args.to_format, args.input, args.output, tokenizer=args.tokenizer
        )
    except (ConvertError, CheckpointError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def sweep_command(args, overrides) -> int:
    import shlex

    from gptjax import config as config_lib
    from gptjax import sweep as sweep_lib
    from gptjax.checkpoint import CheckpointError
    from gptjax.data import DataError
    from gptjax.tokenizer import TokenizerError
    from gptjax.workdir import WorkdirError

    items = [f"{k[len('sweep_') :]}={v}" for k, v in vars(args).items() if k.startswith("sweep_")]
    out = args.out or f"runs/sweep_{args.config.rsplit('/', 1)[-1].removesuffix('.py')}"
    try:
        sweep = sweep_lib.make(
            args.config,
            overrides,
            [i for i in items if not i.endswith("=None")],
            args.sizes,
            out,
            tokens=args.tokens or "",
            isoflop=args.isoflop or "",
        )
        if args.print_commands:
            sweep_lib.print_commands(sweep)
            sweep_lib.write_results(sweep)
            return 0
        print(sweep_lib.format_plan(sweep), flush=True)
        if args.run:
            from gptjax import train
            from gptjax.checkpoint import CheckpointWriteError

            try:
                rows = sweep_lib.run_all(sweep)
            except train.Preempted as e:
                print(f"gptjax: {e}; re-run the same sweep command to resume", file=sys.stderr)
                return 143
            except CheckpointWriteError as e:
                print(f"gptjax: {e}", file=sys.stderr)
                return 1
        elif args.collect:
            rows = sweep_lib.write_results(sweep)
        else:
            print(f"{len(sweep.runs)} runs; --run trains them here, --print-commands prints them")
            return 0
    except (config_lib.ConfigError, DataError, CheckpointError, TokenizerError,
            WorkdirError) as e:  # fmt: skip
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(sweep_lib.format_table(rows))
    done = sum(r["status"] == "done" for r in rows)
    print(f"{done}/{len(rows)} runs finished; results in {shlex.quote(str(sweep.out))}/results.csv")
    return 0


def scaling_fit_command(args, _overrides) -> int:
    from gptjax import scaling

    try:
        if args.metric:
            from gptjax import scaling_metric

            scaling_metric.main(args.results, args.metric, budget=args.budget, out=args.out,
                                bootstrap_samples=args.bootstrap, seed=args.seed)  # fmt: skip
        else:
            scaling.main(args.results, budget=args.budget, out=args.out, params=args.params,
                         bootstrap=args.bootstrap, seed=args.seed)  # fmt: skip
    except scaling.ScalingError as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    return 0


def plan_command(args, overrides) -> int:
    from gptjax import config as config_lib

    try:
        cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"gptjax: config error: {e}", file=sys.stderr)
        return 2
    if args.tpu:  # libtpu compiles for the topology: no simulated CPU devices
        from gptjax import tpu

        return tpu.cli_plan(args, cfg)
    from gptjax import plan as plan_lib
    from gptjax.sharding import parse_mesh

    if args.search:
        n = plan_lib.compile_devices(None, args.max_devices)
    else:
        try:
            mesh = parse_mesh(args.mesh) if args.mesh else cfg.mesh
        except config_lib.ConfigError:
            mesh = cfg.mesh  # reported below, in this process
        n = plan_lib.compile_devices(mesh, args.devices)
    argv = ["plan", "--config", args.config, "--device", args.device, "--mfu", str(args.mfu)]
    argv += ["--usable", str(args.usable), "--max-devices", str(args.max_devices)]
    argv += ["--max-tensor", str(args.max_tensor), *[f"--config.{o}" for o in overrides]]
    argv += ["--search"] if args.search else []
    argv += ["--mesh", args.mesh] if args.mesh else []
    argv += ["--devices", str(args.devices)] if args.devices else []
    if (rerun := plan_lib.with_cpu_devices(n, argv)) is not None:
        return rerun
    try:
        if cfg.model.vocab_size <= 0:
            raise plan_lib.PlanError("set model.vocab_size (--config.model.vocab_size=N)")
        if args.search:
            print(
                f"searching for the smallest mesh that fits {args.device} "
                f"(<= {args.max_devices} devices, tensor <= {args.max_tensor}):",
                flush=True,
            )
            best, _ = plan_lib.search(
                cfg,
                device=args.device,
                mfu=args.mfu,
                usable=args.usable,
                max_devices=args.max_devices,
                max_tensor=args.max_tensor,
                log=lambda line: print(line, flush=True),
            )
            if best is None:
                print(f"gptjax: nothing up to {args.max_devices} devices fits {args.device}")
                return 1
            print(plan_lib.format_plan(best, cfg))
            return 0
        mesh = parse_mesh(args.mesh) if args.mesh else cfg.mesh
        layout = plan_lib.resolve_layout(mesh, args.devices)
        p = plan_lib.plan(cfg, layout, device=args.device, mfu=args.mfu, usable=args.usable)
    except (plan_lib.PlanError, config_lib.ConfigError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(plan_lib.format_plan(p, cfg))
    return 0 if p.fits else 1


def finetune_command(args, overrides) -> int:
    from gptjax import distributed
    from gptjax.config import ConfigError

    try:
        from gptjax import finetune as ft

        if args.init_from:
            overrides = [*overrides, f"finetune.init_from={args.init_from}"]
        cfg = ft.load_config(args.config, overrides)
        # Before anything touches a JAX backend: one process of several, or alone.
        distributed.initialize(cfg.distributed)
    except ConfigError as e:
        print(f"gptjax: config error: {e}", file=sys.stderr)
        return 2
    from gptjax.checkpoint import CheckpointError
    from gptjax.finetune_data import FinetuneDataError
    from gptjax.tokenizer import TokenizerError
    from gptjax.workdir import WorkdirError

    user_errors = (ConfigError, CheckpointError, FinetuneDataError, TokenizerError, WorkdirError)
    status, results = run_job(lambda: ft.finetune(cfg, args.workdir), user_errors)
    if status:
        return status
    import jax

    if jax.process_index() == 0:
        dev = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("dev_"))
        print(f"best epoch {results['best_epoch']}: {dev}; wrote {args.workdir}/results.json")
    return 0


def predict_command(args, _overrides) -> int:
    from gptjax.checkpoint import CheckpointError
    from gptjax.config import ConfigError
    from gptjax.finetune import predict
    from gptjax.finetune_data import FinetuneDataError
    from gptjax.tokenizer import TokenizerError

    try:
        summary = predict(args.checkpoint, args.task, args.output, args.batch_size)
    except (ConfigError, CheckpointError, FinetuneDataError, TokenizerError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v}" for k, v in summary.items()), f"-> {args.output}")
    return 0


def parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected comma-separated integers") from None
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots {text!r}: expected K >= 0")
    return tuple(dict.fromkeys(shots))


def eval_command(args, overrides) -> int:
    """`gptjax eval`: 0 ok, 1 a task failed at run time (others still reported),
    2 bad input (task, data file, checkpoint, arguments)."""
    from gptjax import distributed
    from gptjax.config import ConfigError, DistributedConfig
    from gptjax.eval.tasks import EvalInputError, parse_task_arg, resolve_task
    from gptjax.sharding import make_mesh, parse_mesh

    def bad(msg) -> int:
        print(f"gptjax eval: {msg}", file=sys.stderr)
        return distributed.leave(2)  # one process of several: do not wait for the others

    try:  # before anything starts a JAX backend: one process of several, or alone
        distributed.initialize(DistributedConfig())
        shots = parse_shots(args.shots)
        parse_mesh(args.mesh)  # a bad --mesh is bad input, said before any model work
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
        if args.num_beams < 1:
            raise ValueError("--num-beams must be >= 1 (1: greedy)")
        if args.max_gen_tokens < 1:
            raise ValueError("--max-gen-tokens must be >= 1")
        # Every task is read and checked before any model work.
        tasks = [resolve_task(t, fewshot_from, args.tfds_data_dir) for t in args.task]
    except (ConfigError, EvalInputError, ValueError) as e:
        return bad(e)

    import jax

    from gptjax.checkpoint import CheckpointError
    from gptjax.eval.compile_cache import compile_cache_dir, use_compile_cache
    from gptjax.eval.harness import RunOptions, run
    from gptjax.eval.scoring import EvalModel

    use_compile_cache(None if args.no_compile_cache else compile_cache_dir())
    try:
        mesh = make_mesh(args.mesh)
        model = EvalModel.load(
            args.checkpoint, mesh=mesh, batch_size=args.batch_size, dtype=args.dtype
        )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        return bad(e)
    plot = args.plot or (args.output.with_suffix(".png") if args.output else None)
    writer = jax.process_index() == 0  # every process scores (its rows); process 0 writes
    opts = RunOptions(
        shots=shots,
        limit=args.limit,
        seed=args.seed,
        max_gen_tokens=args.max_gen_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        output=args.output if writer else None,
        samples=args.log_samples if writer else None,
        plot=plot if writer else None,
    )
    meta = {"checkpoint": str(args.checkpoint), "mesh": dict(mesh.shape)}
    meta |= {"dtype": model.cfg.compute_dtype, "processes": jax.process_count()}
    try:
        report = run(model, tasks, opts, meta)
    except Exception as e:
        if distributed.is_multiprocess():  # the others are stuck in a collective with us
            distributed.exit_now(e)
        raise
    if writer:
        print(report["table"])
        from gptjax.eval.synthetic import paper_tables

        paper = paper_tables(report["results"], Path(str(args.checkpoint).rstrip("/")).name)
        if paper:
            print("\n" + paper)
        for path in (opts.output, opts.plot, opts.samples):
            if path:
                print(f"wrote {path}")
    return 1 if any("error" in r for r in report["results"]) else 0
