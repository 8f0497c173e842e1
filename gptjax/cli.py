"""The `gptjax` command: parses arguments and dispatches. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from gptjax import hostmem


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--config.a.b=value` or `--config.a.b value` -> ["a.b=value", ...]."""
    overrides, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognized argument: {arg}")
        key = arg[len("--config.") :]
        if "=" not in key:
            if i + 1 >= len(extra):
                parser.error(f"{arg} needs a value")
            key, i = f"{key}={extra[i + 1]}", i + 1
        overrides.append(key)
        i += 1
    return overrides


def _run_job(job, user_errors: tuple[type[Exception], ...]) -> tuple[int, object]:
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


def _train(args, overrides) -> int:
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
    return _run_job(lambda: train.train(cfg, args.workdir), user_errors)[0]


def _tokenizer_train(args, _overrides) -> int:
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


def _data_prepare(args, overrides) -> int:
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


def _generate(args, _overrides) -> int:
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


def _convert(args, _overrides) -> int:
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


def _sweep(args, overrides) -> int:
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


def _scaling_fit(args, _overrides) -> int:
    from gptjax import scaling

    try:
        scaling.main(args.results, budget=args.budget, out=args.out, params=args.params,
                     bootstrap=args.bootstrap, seed=args.seed)  # fmt: skip
    except scaling.ScalingError as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args, overrides) -> int:
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


def _finetune(args, overrides) -> int:
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
    status, results = _run_job(lambda: ft.finetune(cfg, args.workdir), user_errors)
    if status:
        return status
    import jax

    if jax.process_index() == 0:
        dev = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("dev_"))
        print(f"best epoch {results['best_epoch']}: {dev}; wrote {args.workdir}/results.json")
    return 0


def _predict(args, _overrides) -> int:
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


def _parse_shots(text: str) -> tuple[int, ...]:
    try:
        shots = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected comma-separated integers") from None
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots {text!r}: expected K >= 0")
    return tuple(dict.fromkeys(shots))


def _eval(args, overrides) -> int:
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
        shots = _parse_shots(args.shots)
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
    from gptjax.eval.harness import RunOptions, run
    from gptjax.eval.scoring import EvalModel, compile_cache_dir, use_compile_cache

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (or resume) a GPT")
    p.add_argument("--config", required=True, help="configs/X.py")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and logs go here")
    p.epilog = "Any config field can be overridden: --config.train.steps=100"
    p.set_defaults(func=_train, takes_overrides=True)

    p = sub.add_parser("generate", help="sample from a checkpoint with a KV cache")
    p.add_argument("--checkpoint", required=True, help="checkpoint dir or training workdir")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, help=">= 1")
    p.add_argument("--temperature", type=float, default=1.0, help=">= 0; 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 (off) up to the vocabulary size")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 is off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-beams", type=int, default=1,
                   help="beam width; > 1 is deterministic beam search as transformers' "
                   "generate(num_beams=N, early_stopping=True) (temperature, top-k, top-p "
                   "do not apply)")  # fmt: skip
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a hypothesis scores sum log p / tokens ** this "
                   "(the GPT-3 paper: 0.6)")  # fmt: skip
    p.add_argument("--stop", action="append",
                   help="stop sequence (text; repeatable; needs the checkpoint's tokenizer): "
                   "text is cut before it; with --format ids the ids are cut before the "
                   "token in which it begins")  # fmt: skip
    p.add_argument("--stop-id", action="append", type=int,
                   help="stop token id (repeatable; default: the tokenizer's EOS)")  # fmt: skip
    p.add_argument("--format", choices=("text", "ids"), default="text",
                   help="text (needs a tokenizer): the prompt and its continuation, or for "
                   "--prompt-ids the new text; ids: the new token ids, one comma-separated "
                   "line per prompt")  # fmt: skip
    p.add_argument("--mesh", help="data=D,fsdp=F,tensor=T: generate on a device mesh, "
                   "the parameters sharded as in training (axes left out are 1; one may "
                   "be -1)")  # fmt: skip
    p.set_defaults(func=_generate, takes_overrides=False)

    p = sub.add_parser("convert", help="import a foreign checkpoint or export a gptjax one")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="from_format", choices=["hf-gpt2", "llama2c"])
    g.add_argument("--to", dest="to_format", choices=["hf-gpt2"])
    p.add_argument("--input", required=True, help="HF dir / llama2.c model.bin / gptjax checkpoint")
    p.add_argument("--output", required=True, help="new (empty or absent) directory")
    p.add_argument("--tokenizer", help="with --from: record this tokenizer in the checkpoint "
                   "(a SentencePiece .model file, or a directory with GPT-2 BPE encoder.json "
                   "+ vocab.bpe), e.g. the vocabulary of a llama2.c model; it must not have "
                   "more ids than the model embeds")  # fmt: skip
    p.set_defaults(func=_convert, takes_overrides=False)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece model (lossless round-trip)")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--output", required=True, help="path of the .model file to write")
    t.set_defaults(func=_tokenizer_train, takes_overrides=False)

    p = sub.add_parser("data", help="pretraining data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("prepare", help="tokenise data.sources into ArrayRecord shards "
                        "(train on them with --config.data.sources=prepared:DIR)")  # fmt: skip
    d.add_argument("--config", required=True, help="configs/X.py (data.sources, tokenizer)")
    d.add_argument("--output", required=True, help="directory to create (resumed if partial)")
    d.add_argument("--workers", type=int, help="tokenising processes (default: all cores)")
    d.add_argument("--runner", choices=("local", "beam"), default="local",
                   help="local processes, or an Apache Beam pipeline (the beam extra)")  # fmt: skip
    d.add_argument("--beam-options", default="", help='Beam pipeline options, e.g. '
                   '"--runner=DataflowRunner --project=P ..." (default: DirectRunner)')  # fmt: skip
    d.add_argument("--shard-mb", type=float, default=64.0, help="input MiB per shard")
    d.epilog = "Any config field can be overridden: --config.data.sources=a.txt,b.jsonl"
    d.set_defaults(func=_data_prepare, takes_overrides=True)

    p = sub.add_parser("sweep", help="scaling-law sweep: generate, run or print, collect")
    p.add_argument("--config", required=True, help="base config file, e.g. configs/scaling_tiny.py")
    p.add_argument("--sizes", required=True, help="model widths (d_model), e.g. 32,64,128")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tokens", help="grid sweep: token counts D, e.g. 500k,2M")
    g.add_argument("--isoflop", help="isoFLOP sweep: compute budgets C, e.g. 1e11,1e12")
    p.add_argument("--out", help="sweep directory (default runs/sweep_<config name>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", action="store_true", help="train the runs here, one after another")
    g.add_argument("--print-commands", action="store_true", help="print `gptjax train` commands")
    g.add_argument("--collect", action="store_true", help="only collect finished runs' results")
    from gptjax.config import SweepConfig

    for field in dataclasses.fields(SweepConfig):
        p.add_argument(f"--sweep.{field.name}", dest=f"sweep_{field.name}", metavar="VALUE")
    p.epilog = "Sweep rule fields: --sweep.aspect_ratio=32; base config fields: --config.x.y=v"
    p.set_defaults(func=_sweep, takes_overrides=True)

    p = sub.add_parser("scaling", help="scaling-law fits of a sweep's results")
    ssub = p.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="fit L(N,D) (Chinchilla approach 3) and isoFLOP minima (2)")
    f.add_argument("results", help="results.json / results.csv, or the sweep directory")
    f.add_argument("--budget", type=float, help="compute budget C (FLOPs) to plan for")
    f.add_argument("--out", help="where fit.json and the PNGs go (default: beside RESULTS)")
    f.add_argument("--params", choices=("params", "params_total"), default="params",
                   help="N: non-embedding (params, default) or all parameters")  # fmt: skip
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_scaling_fit, takes_overrides=False)

    p = sub.add_parser("plan", help="per-device memory and step time of a mesh (docs/scaling.md)")
    p.add_argument("--config", required=True, help="configs/X.py")
    p.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (axes left out are 1; one may be -1)")
    p.add_argument("--devices", type=int, help="device count, to resolve a -1 mesh axis")
    p.add_argument("--device", default="h100", help="h100, h200, a100, v4, v5e, v5p, v6e, ...")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU the step time assumes")
    p.add_argument("--usable", type=float, default=0.9, help="fraction of HBM a plan may use")
    p.add_argument("--search", action="store_true", help="find the smallest mesh that fits")
    p.add_argument("--max-devices", type=int, default=4096, help="search: most devices")
    p.add_argument("--max-tensor", type=int, default=8, help="search: largest tensor axis")
    p.add_argument("--tpu", help="compile with libtpu for a TPU topology: v4:4x4x8, v5e:16x16, "
                   "v5p:8x8x16, v6e:16x16 (v5p-2048 = v5p:8x8x16: docs/tpu.md); --search: "
                   "slices up to it (a bare v5p: all)")  # fmt: skip
    p.add_argument("--slices", type=int, default=1, help="--tpu: slices joined over DCN")
    p.add_argument("--step", choices=("train", "eval", "decode"), default="train",
                   help="--tpu: the program to compile: a train step, the scoring program "
                   "of `gptjax eval`, or one KV-cache decode step")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="--step eval/decode: rows/sequences")
    p.epilog = "Exit status 0: fits; 1: does not fit; 2: error. Overrides: --config.x.y=v"
    p.set_defaults(func=_plan, takes_overrides=True)

    p = sub.add_parser("finetune", help="GPT-1 discriminative fine-tuning (docs/finetune.md)")
    p.add_argument("--config", required=True, help="configs/finetune/X.py")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, results.json")
    p.add_argument("--init-from", default="", help="pretraining workdir or converted checkpoint")
    p.epilog = "Any config field can be overridden: --config.finetune.lm_coef=0"
    p.set_defaults(func=_finetune, takes_overrides=True)

    p = sub.add_parser("predict", help="predictions of a fine-tuned checkpoint")
    p.add_argument("--checkpoint", required=True, help="finetune workdir (its best epoch)")
    p.add_argument("--task", required=True, help="NAME=PATH, e.g. sst2=dev.tsv")
    p.add_argument("--output", required=True, help="JSON lines, one per example")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_predict, takes_overrides=False)

    p = sub.add_parser(
        "eval",
        help="few-shot evaluation of a checkpoint (docs/eval.md)",
        description="few-shot evaluation of a gptjax checkpoint",
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
    p.add_argument("--num-beams", type=int, default=4,
                   help="free-form answers: beam width (the GPT-3 paper's 4); 1 is greedy, "
                   "as lm-eval's generate_until")  # fmt: skip
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="beam search: a hypothesis scores sum log p / tokens ** this")  # fmt: skip
    p.add_argument(
        "--mesh",
        default="data=-1",
        help="data=D,fsdp=F,tensor=T (default: all devices data-parallel)",
    )
    p.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default=None,
        help="the weights are read in, and scoring runs in, this dtype (default: the "
        "checkpoint's compute dtype)",
    )  # fmt: skip
    p.add_argument(
        "--no-compile-cache", action="store_true",
        help="do not keep compiled scoring programs in ~/.cache/gptjax/jax "
        "($XDG_CACHE_HOME; JAX_COMPILATION_CACHE_DIR, when set, wins)",
    )  # fmt: skip
    p.add_argument("--tfds-data-dir", default=None)
    p.set_defaults(func=_eval, takes_overrides=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["train"], ["finetune"]):  # before JAX starts its threads; see hostmem
        hostmem.keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser) if args.takes_overrides else []
    if extra and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
