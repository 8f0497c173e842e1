"""The `gptjax` command: parses arguments and dispatches. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys


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


def _train(args, overrides) -> int:
    from gptjax import config as config_lib

    try:
        cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"gptjax: config error: {e}", file=sys.stderr)
        return 2
    from gptjax import train
    from gptjax.checkpoint import CheckpointError
    from gptjax.data import DataError

    try:
        train.train(cfg, args.workdir)
    except (config_lib.ConfigError, DataError, CheckpointError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 3
    except train.Preempted as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 143
    return 0


def _tokenizer_train(args, _overrides) -> int:
    from gptjax.data import DataError
    from gptjax.tokenizer import train_sentencepiece

    try:
        out = train_sentencepiece(args.input, args.vocab_size, args.output)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _generate(args, _overrides) -> int:
    from gptjax.checkpoint import CheckpointError
    from gptjax.generate import Sampling, from_checkpoint

    if bool(args.prompt) == bool(args.prompt_ids):
        print("gptjax: give --prompt (text) or --prompt-ids (ids), not both", file=sys.stderr)
        return 2
    try:
        prompt_ids = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids or []]
        sampling = Sampling(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            stop_ids=tuple(args.stop_id or ()),
        )
        new, texts = from_checkpoint(
            args.checkpoint, args.prompt or [], prompt_ids, sampling, args.seed, args.stop or []
        )
    except (CheckpointError, ValueError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    if args.format == "ids" or texts is None:
        for ids in new:
            print(",".join(map(str, ids)))
    else:
        for prompt, text in zip(args.prompt, texts, strict=True):
            print(prompt + text)
    return 0


def _convert(args, _overrides) -> int:
    from gptjax.checkpoint import CheckpointError
    from gptjax.convert import ConvertError, convert

    try:
        out = convert(args.from_format, args.to_format, args.input, args.output)
    except (ConvertError, CheckpointError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


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
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop sequence (text; repeatable)")
    p.add_argument("--stop-id", action="append", type=int, help="stop token id (repeatable)")
    p.add_argument("--format", choices=("text", "ids"), default="text", help="ids: new token ids")
    p.set_defaults(func=_generate, takes_overrides=False)

    p = sub.add_parser("convert", help="import a foreign checkpoint or export a gptjax one")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from", dest="from_format", choices=["hf-gpt2", "llama2c"])
    g.add_argument("--to", dest="to_format", choices=["hf-gpt2"])
    p.add_argument("--input", required=True, help="HF dir / llama2.c model.bin / gptjax checkpoint")
    p.add_argument("--output", required=True, help="new (empty or absent) directory")
    p.set_defaults(func=_convert, takes_overrides=False)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece model (lossless round-trip)")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--output", required=True, help="path of the .model file to write")
    t.set_defaults(func=_tokenizer_train, takes_overrides=False)

    # Listed for --help; `main` hands `gptjax eval ...` to gptjax.eval's own parser.
    p = sub.add_parser(
        "eval", help="few-shot evaluation of a checkpoint (docs/eval.md)", add_help=False
    )
    p.set_defaults(func=None, takes_overrides=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:
        from gptjax.eval import cli_main

        return cli_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = _split_overrides(extra, parser) if args.takes_overrides else []
    if extra and not args.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
