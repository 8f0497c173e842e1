"""Evaluation throughput on this CPU: `gptjax eval` vs lm-eval's hf backend, same weights.

A random-init transformers GPT2LMHeadModel (GPT-2 BPE, a small config) is saved with its
tokenizer; gptjax.convert.import_hf_gpt2 turns the same weights into a gptjax checkpoint.
Both score HellaSwag 0-shot on the shared 200-question slice (lm-eval through a local
task YAML equivalent to its `hellaswag` task), and the script prints examples/s, the
ratios, and both accuracies (which must agree: same weights, same prompts).

Only evaluation is timed, on both sides: the models are loaded (lm-eval's HFLM object,
gptjax's EvalModel) and the tasks built (lm-eval's dataset and Task, gptjax's parsed
file) before the clock starts. Each side is timed twice on the same objects: cold (the
first pass: gptjax compiles its few bucketed shapes, torch warms its allocator and
kernels) and warm (a second pass, steady state). The ratios printed are gptjax / lm-eval
examples/s, cold against cold and warm against warm.

    python bench/eval_throughput.py                  # defaults: 4 x 256, 200 questions
    python bench/eval_throughput.py --limit 100 --batch-size 32
    python bench/eval_throughput.py --task nq_open --limit 100   # greedy generate_until

With --task nq_open both generate greedily (lm-eval's nq_open.yaml over the shared dev
file, `gptjax eval --num-beams 1`), --max-gen-tokens each, and the exact-match scores
must agree; questions/s are printed.

torch, transformers and lm-eval are bench-only extras, imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python bench/eval_throughput.py`
    sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
# The zero-shot suite of --suite: every shared file whole (HellaSwag and PIQA are the
# shared 200-question slices; ARC is not among the shared data).
SUITE = ("piqa", "hellaswag", "rte", "cb", "sst2")  # multiple choice; also: wikitext


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=None, help="default 4 (6 with --suite)")
    p.add_argument("--d-model", type=int, default=None, help="default 256 (384 with --suite)")
    p.add_argument("--n-head", type=int, default=None, help="default 4 (6 with --suite)")
    p.add_argument("--n-ctx", type=int, default=None, help="default 256 (512 with --suite)")
    p.add_argument("--task", choices=("hellaswag", "nq_open"), default="hellaswag")
    p.add_argument(
        "--suite",
        action="store_true",
        help="first-run mode: the zero-shot suite (or --suite-tasks) end to end, each side "
        "in fresh processes, cold (empty caches) then warm; and lm-eval driving gptjax",
    )
    p.add_argument(
        "--suite-tasks",
        default=",".join(SUITE),
        help="comma-separated, of: " + ", ".join((*SUITE, "wikitext")),
    )
    p.add_argument("--suite-limit", type=int, default=0, help="--suite: first N of each task")
    p.add_argument("--no-adapter", action="store_true", help="--suite: skip the adapter runs")
    p.add_argument("--limit", type=int, default=200, help="questions")
    p.add_argument("--max-gen-tokens", type=int, default=16, help="nq_open: per question")
    p.add_argument("--batch-size", type=int, default=32, help="both frameworks")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    p.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="default",
        help="keep: gptjax.hostmem.keep_freed_memory() for the whole process (what `gptjax "
        "train` applies; it made this bench slower for gptjax, faster for lm-eval); "
        "default: glibc's defaults, as `gptjax eval` runs",
    )
    args = p.parse_args(argv)
    for name, task, suite in (("n_layer", 4, 6), ("d_model", 256, 384), ("n_head", 4, 6),
                              ("n_ctx", 256, 512)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, suite if args.suite else task)
    return args


def make_hf_model(args, out: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(0)
    bpe = args.data / "gpt2_bpe"
    out.mkdir(parents=True, exist_ok=True)
    # from_pretrained reads vocab.json + merges.txt in every transformers version (v5's
    # constructor silently builds an empty vocabulary from vocab_file=/merges_file=).
    (out / "vocab.json").write_bytes((bpe / "encoder.json").read_bytes())
    (out / "merges.txt").write_bytes((bpe / "vocab.bpe").read_bytes())
    tok = GPT2TokenizerFast.from_pretrained(str(out))
    assert tok("Hello world").input_ids == [15496, 995], "GPT-2 tokenizer did not load"
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=args.n_ctx,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for name in ("encoder.json", "vocab.bpe"):  # the files gptjax's importer reads
        (out / name).write_bytes((bpe / name).read_bytes())
    return out


def hellaswag_task_dir(args, work: Path) -> Path:
    """A local-file lm-eval task equivalent to lm-eval's `hellaswag` (same prompt:
    query -> " " + ending; acc, acc_norm) over the shared text export."""
    lines = (args.data / "hellaswag" / "hellaswag_val_first200.txt").read_text("utf-8").split("\n")
    data = work / "hellaswag.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(0, len(lines) - 5, 6):
            doc = {"query": lines[i], "gold": int(lines[i + 1]), "choices": lines[i + 2 : i + 6]}
            f.write(json.dumps(doc) + "\n")
    tasks = work / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "hellaswag_local.yaml").write_text(
        "task: hellaswag_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'doc_to_choice: "choices"\n'
        "num_fewshot: 0\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return tasks


def nq_open_task_dir(args, work: Path) -> Path:
    """lm-eval's own nq_open.yaml over the shared dev file (few-shot pool: EfficientQA
    dev), with max_gen_toks set."""
    import lm_eval

    yaml = (Path(lm_eval.__file__).parent / "tasks" / "nq_open" / "nq_open.yaml").read_text()
    yaml = yaml.replace("task: nq_open", "task: nq_open_local").replace(
        "dataset_path: google-research-datasets/nq_open",
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {args.data / 'nq_open' / 'NQ-open.efficientqa.dev.1.1.jsonl'}\n"
        f"    validation: {args.data / 'nq_open' / 'NQ-open.dev.jsonl'}",
    )
    yaml = yaml.replace(
        "  do_sample: false", f"  do_sample: false\n  max_gen_toks: {args.max_gen_tokens}"
    )
    tasks = work / "lm_eval_tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "nq_open_local.yaml").write_text(yaml, encoding="utf-8")
    return tasks


METRICS = {  # task -> {our metric: lm-eval's result key}
    "hellaswag": {"acc": "acc,none", "acc_norm": "acc_norm,none"},
    "nq_open": {"exact_match": "exact_match,remove_whitespace"},
}


def run_lm_eval(args, hf_dir: Path, task_dir: Path) -> list[tuple[float, dict]]:
    """lm-eval's hf backend, evaluation only: the HFLM (model + tokenizer on the CPU) and
    the task (dataset, documents) are built before timing; cold and warm passes."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
    manager = TaskManager(include_path=str(task_dir))
    names = [f"{args.task}_local"]  # TaskManager.load is get_task_dict's successor
    task_dict = manager.load(names) if hasattr(manager, "load") else get_task_dict(names, manager)
    out = []
    for _ in range(2):  # cold, warm
        start = time.perf_counter()
        res = evaluate(lm=lm, task_dict=task_dict, limit=args.limit, log_samples=False)
        seconds = time.perf_counter() - start
        r = res["results"][f"{args.task}_local"]
        out.append((seconds, {m: r[key] for m, key in METRICS[args.task].items()}))
    return out


def run_gptjax(args, ckpt: Path) -> list[tuple[float, dict]]:
    """gptjax, evaluation only: the model loaded and the task file parsed before timing;
    cold (compiles) and warm passes."""
    from gptjax.eval import harness, tasks
    from gptjax.eval.scoring import EvalModel

    model = EvalModel.load(ckpt, batch_size=args.batch_size)
    data = {
        "hellaswag": "hellaswag/hellaswag_val_first200.txt",
        "nq_open": "nq_open/NQ-open.dev.jsonl",
    }
    task = tasks.resolve_task(f"{args.task}={args.data / data[args.task]}")
    opts = harness.RunOptions(limit=args.limit, num_beams=1, max_gen_tokens=args.max_gen_tokens)
    out = []
    for _ in range(2):  # cold (compiles), warm
        start = time.perf_counter()
        result, _ = harness.evaluate_task(model, task, 0, opts)
        seconds = time.perf_counter() - start
        out.append((seconds, {m: result["metrics"][m]["value"] for m in METRICS[args.task]}))
    print(f"gptjax compiled shapes: {len(model.scorer.shapes)}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite:
        import eval_suite  # bench/eval_suite.py

        return eval_suite.main(args, make_hf_model)
    # Optionally the allocator settings of `gptjax train` (gptjax/hostmem.py), before either
    # framework starts its threads; process-wide, so lm-eval's torch runs under them too.
    from gptjax import hostmem

    kept = args.malloc == "keep" and hostmem.keep_freed_memory()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.data / "hellaswag").is_dir():
        print(f"shared data not found at {args.data}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptjax_eval_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "hf_gpt2"
    ckpt = work / "gptjax_ckpt"
    if not hf_dir.exists():
        make_hf_model(args, hf_dir)
    if not ckpt.exists():
        from gptjax.convert import import_hf_gpt2

        import_hf_gpt2(hf_dir, ckpt)
    task_dir = (hellaswag_task_dir if args.task == "hellaswag" else nq_open_task_dir)(args, work)

    import jax
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); malloc "
        + ("kept for reuse (gptjax.hostmem), both frameworks" if kept else "glibc defaults")
    )
    what = {"hellaswag": "HellaSwag 0-shot, {} questions (4 endings each)",
            "nq_open": "nq_open 0-shot, {} questions, greedy, "
                       f"{args.max_gen_tokens} new tokens at most"}[args.task]  # fmt: skip
    print(
        f"model: GPT-2 {args.n_layer} layers x d_model {args.d_model}, {args.n_head} heads, "
        f"n_ctx {args.n_ctx}, vocab 50257, float32; {what.format(args.limit)}, "
        f"batch size {args.batch_size}"
    )
    (cold_s, cold), (warm_s, warm) = run_gptjax(args, ckpt)
    (lm_cold_s, lm_cold), (lm_warm_s, lm_warm) = run_lm_eval(args, hf_dir, task_dir)
    n = min(args.limit, 200 if args.task == "hellaswag" else 3610)
    names = list(METRICS[args.task])
    rows = [
        ("lm-eval hf (torch), cold", lm_cold_s, lm_cold),
        ("lm-eval hf (torch), warm", lm_warm_s, lm_warm),
        ("gptjax eval, cold (incl. compile)", cold_s, cold),
        ("gptjax eval, warm", warm_s, warm),
    ]
    print("\ntimes: evaluation only (models loaded and tasks built beforehand)")
    print(
        f"{'backend':36s} {'seconds':>8s} {'questions/s':>11s} "
        + " ".join(f"{m:>11s}" for m in names)
    )
    for name, s, m in rows:
        print(f"{name:36s} {s:8.2f} {n / s:11.2f} " + " ".join(f"{m[k]:11.3f}" for k in names))
    print(
        f"\nratio gptjax/lm-eval examples/s: warm {lm_warm_s / warm_s:.2f}x (warm vs warm), "
        f"cold {lm_cold_s / cold_s:.2f}x (cold vs cold)"
    )
    same = all(
        abs(a[k] - b[k]) < 1e-9
        for a, b in ((warm, lm_warm), (cold, lm_cold), (warm, cold))
        for k in names
    )
    print(f"scores identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
