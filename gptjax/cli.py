"""The `gptjax` command: parses arguments and dispatches. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from gptjax import commands, hostmem


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain (or resume) a GPT")
    p.add_argument("--config", required=True, help="configs/X.py")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and logs go here")
    p.epilog = "Any config field can be overridden: --config.train.steps=100"
    p.set_defaults(func=commands.train_command, takes_overrides=True)

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
    p.set_defaults(func=commands.generate_command, takes_overrides=False)

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
    p.set_defaults(func=commands.convert_command, takes_overrides=False)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a sentencepiece model (lossless round-trip)")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--output", required=True, help="path of the .model file to write")
    t.set_defaults(func=commands.tokenizer_train_command, takes_overrides=False)

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
    d.set_defaults(func=commands.data_prepare_command, takes_overrides=True)

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
    p.set_defaults(func=commands.sweep_command, takes_overrides=True)

    p = sub.add_parser("scaling", help="scaling-law fits of a sweep's results")
    ssub = p.add_subparsers(dest="scaling_command", required=True)
    f = ssub.add_parser("fit", help="fit L(N,D) (Chinchilla approach 3) and isoFLOP minima (2)")
    f.add_argument("results", help="results.json / results.csv, or the sweep directory")
    f.add_argument("--budget", type=float, help="compute budget C (FLOPs) to plan for")
    f.add_argument("--out", help="where fit.json and the PNGs go (default: beside RESULTS)")
    f.add_argument("--params", choices=("params", "params_total"), default="params",
                   help="N: non-embedding (params, default) or all parameters")  # fmt: skip
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
    f.add_argument("--metric", metavar="eval/TASK/METRIC",
                   help="fit this few-shot metric (a results column) against compute C "
                   "instead of the loss: its error = E + A / C^alpha (docs/scaling.md)")  # fmt: skip
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=commands.scaling_fit_command, takes_overrides=False)

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
    p.set_defaults(func=commands.plan_command, takes_overrides=True)

    p = sub.add_parser("finetune", help="GPT-1 discriminative fine-tuning (docs/finetune.md)")
    p.add_argument("--config", required=True, help="configs/finetune/X.py")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, results.json")
    p.add_argument("--init-from", default="", help="pretraining workdir or converted checkpoint")
    p.epilog = "Any config field can be overridden: --config.finetune.lm_coef=0"
    p.set_defaults(func=commands.finetune_command, takes_overrides=True)

    p = sub.add_parser("predict", help="predictions of a fine-tuned checkpoint")
    p.add_argument("--checkpoint", required=True, help="finetune workdir (its best epoch)")
    p.add_argument("--task", required=True, help="NAME=PATH, e.g. sst2=dev.tsv")
    p.add_argument("--output", required=True, help="JSON lines, one per example")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=commands.predict_command, takes_overrides=False)

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
    p.add_argument(
        "--batch-size", type=int, default=32,
        help="rows scored per batch, each n_ctx tokens of packed requests (prompts per "
        "batch when generating)",
    )  # fmt: skip
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
    p.set_defaults(func=commands.eval_command, takes_overrides=False)
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
