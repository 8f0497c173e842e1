"""`python bench/eval_throughput.py --suite`: a user's first run of a zero-shot suite.

Every leg is a fresh process timed end to end (imports, model loading, data reading,
compiling, scoring, writing results), as a user runs it:

  gptjax     `gptjax eval --checkpoint CKPT --task piqa=... --task hellaswag=... ...`
  lm-eval    lm-eval's `simple_evaluate(model="hf", ...)` on the same weights (a
             transformers GPT2LMHeadModel), over local task YAMLs that are lm-eval's
             own task definitions with the shared files as data
  adapter    the same lm-eval call with model="gptjax" (gptjax.eval.lm_eval_adapter)

Cold: caches empty (a fresh $XDG_CACHE_HOME, so gptjax's persistent compile cache and
lm-eval's datasets cache start empty). Warm: the same command again on those caches.
Every metric of every task must agree between gptjax and lm-eval (acc, acc_norm to the
question; perplexities to 1e-4 relative), or the script exits 1.

    python bench/eval_throughput.py --suite          # PIQA, HellaSwag, RTE, CB, SST-2
    python bench/eval_throughput.py --suite --suite-tasks sst2 --suite-limit 600
    python bench/eval_throughput.py --suite --suite-tasks wikitext --suite-limit 20
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# task -> (gptjax spec file, lm-eval metric names compared)
FILES = {
    "piqa": "piqa/valid_first200.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_first200.txt",
    "rte": "rte/val.jsonl",
    "cb": "cb/val.jsonl",
    "sst2": "sst2/glue_sst2_dev.tsv",
    "wikitext": "wikitext.jsonl",  # written below: one {"page"} per document
}
METRICS = {
    "piqa": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "rte": ("acc",),
    "cb": ("acc",),
    "sst2": ("acc",),
    "wikitext": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}
MC_YAML = """task: {name}_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: {text}
doc_to_target: label
doc_to_choice: {choices}
num_fewshot: 0
metric_list:
{metrics}
"""
# lm-eval's own prompts (lm_eval/tasks/{piqa,hellaswag,glue/rte,super_glue/cb,glue/sst2}).
PROMPTS = {
    "piqa": ('"Question: {{goal}}\\nAnswer:"', '"{{[sol1, sol2]}}"'),
    "hellaswag": ('"{{query}}"', '"choices"'),
    "rte": ('"{{premise}}\\nQuestion: {{hypothesis}} True or False?\\nAnswer:"', '["True", "False"]'),
    "cb": (
        '"{{premise}}\\nQuestion: {{hypothesis}}. True, False, or Neither?\\nAnswer:"',
        "['True', 'False', 'Neither']",
    ),
    "sst2": ('"{{sentence}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"',
             '["negative", "positive"]'),
}  # fmt: skip
LABELS = {"rte": ("entailment", "not_entailment"), "cb": ("entailment", "contradiction", "neutral")}


def _jsonl(path: Path, docs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def write_tasks(data: Path, work: Path, names) -> tuple[list[str], Path]:
    """gptjax --task specs and a directory of lm-eval task YAMLs over the same documents."""
    from gptjax.eval import loaders

    tasks_dir = work / "lm_eval_tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    docs = work / "docs"
    docs.mkdir(exist_ok=True)
    specs = []
    for name in names:
        src = data / FILES[name] if name != "wikitext" else None
        if name == "piqa":
            labels = (data / "piqa" / "valid-labels_first200.lst").read_text().split()
            rows = [json.loads(line) for line in src.read_text("utf-8").splitlines()]
            out = _jsonl(
                docs / "piqa.jsonl",
                [{**r, "label": int(y)} for r, y in zip(rows, labels, strict=True)],
            )
        elif name == "hellaswag":
            lines = src.read_text("utf-8").split("\n")
            out = _jsonl(docs / "hellaswag.jsonl", [
                {"query": lines[i], "label": int(lines[i + 1]), "choices": lines[i + 2 : i + 6]}
                for i in range(0, len(lines) - 5, 6)
            ])  # fmt: skip
        elif name in LABELS:
            rows = [json.loads(line) for line in src.read_text("utf-8").splitlines()]
            out = _jsonl(docs / f"{name}.jsonl",
                         [{**r, "label": LABELS[name].index(r["label"])} for r in rows])  # fmt: skip
        elif name == "sst2":
            rows = [line.split("\t") for line in src.read_text("utf-8").splitlines()[1:] if line]
            out = _jsonl(docs / "sst2.jsonl", [{"sentence": s, "label": int(y)} for s, y in rows])
        else:  # wikitext: gptjax's document split of the shared valid.txt, as {"page"}
            pages = [p for _, p in loaders.wikitext_pages(data / "wikitext-2" / "valid.txt")]
            src = out = _jsonl(docs / "wikitext.jsonl", [{"page": p} for p in pages])
            import lm_eval

            lm_dir = Path(lm_eval.__file__).parent / "tasks" / "wikitext"
            shutil.copy(lm_dir / "preprocess_wikitext.py", tasks_dir)
            yaml = (lm_dir / "wikitext.yaml").read_text()
            yaml = yaml.replace("task: wikitext", "task: wikitext_local")
            yaml = yaml.replace(
                "dataset_path: EleutherAI/wikitext_document_level\ndataset_name: wikitext-2-raw-v1",
                f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out}",
            )
            yaml = yaml.replace("training_split: train\nvalidation_split: validation\n", "")
            (tasks_dir / "wikitext_local.yaml").write_text(yaml)
        specs.append(f"{name}={src}")
        if name != "wikitext":
            text, choices = PROMPTS[name]
            metrics = "\n".join(f"  - metric: {m}" for m in METRICS[name])
            (tasks_dir / f"{name}_local.yaml").write_text(
                MC_YAML.format(name=name, data=out, text=text, choices=choices, metrics=metrics)
            )
    return specs, tasks_dir


LM_EVAL_DRIVER = """
import json, sys
model, args, tasks_dir, names, out, limit = sys.argv[1:7]
if model == "gptjax":
    import gptjax.eval.lm_eval_adapter  # registers "gptjax"
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
res = simple_evaluate(model=model, model_args=args, tasks=names.split(","), num_fewshot=0,
                      task_manager=TaskManager(include_path=tasks_dir), log_samples=False,
                      limit=int(limit) if limit != "none" else None)
json.dump(res["results"], open(out, "w"), default=str)
"""


def run_leg(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; see {log}")
    return seconds


def gptjax_scores(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {
        r["task"]: {m: r["metrics"][m]["value"] for m in METRICS[r["task"]]}
        for r in report["results"]
    }


def lm_eval_scores(path: Path, names) -> dict:
    res = json.loads(path.read_text())
    return {n: {m: float(res[f"{n}_local"][f"{m},none"]) for m in METRICS[n]} for n in names}


def agree(a: dict, b: dict) -> bool:
    return all(
        abs(a[t][m] - b[t][m]) <= (1e-9 if m.startswith("acc") else 1e-4 * abs(b[t][m]))
        for t in b
        for m in b[t]
    )


def main(args, make_hf_model) -> int:
    names = [n.strip() for n in args.suite_tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in FILES]
    if unknown:
        print(f"--suite-tasks: unknown {unknown}; choose from {list(FILES)}", file=sys.stderr)
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptjax_eval_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, ckpt = work / "hf_gpt2", work / "gptjax_ckpt"
    if not hf_dir.exists():
        make_hf_model(args, hf_dir)
    if not ckpt.exists():
        from gptjax.convert import import_hf_gpt2

        import_hf_gpt2(hf_dir, ckpt)
    specs, tasks_dir = write_tasks(args.data, work, names)
    lm_names = ",".join(f"{n}_local" for n in names)
    bs = str(args.batch_size)
    limit = str(args.suite_limit) if args.suite_limit else "none"
    legs = {
        "gptjax": lambda out: [
            sys.executable, "-m", "gptjax.cli", "eval", "--checkpoint", str(ckpt),
            *(a for s in specs for a in ("--task", s)), "--shots", "0",
            "--batch-size", bs, "--output", str(out), "--plot", str(out.with_suffix(".png")),
            *(["--limit", limit] if limit != "none" else []),
        ],
        "lm-eval hf": lambda out: [
            sys.executable, "-c", LM_EVAL_DRIVER, "hf",
            f"pretrained={hf_dir},dtype=float32,device=cpu,batch_size={bs}",
            str(tasks_dir), lm_names, str(out), limit,
        ],
        "lm-eval -> gptjax (adapter)": lambda out: [
            sys.executable, "-c", LM_EVAL_DRIVER, "gptjax", f"checkpoint={ckpt},batch_size={bs}",
            str(tasks_dir), lm_names, str(out), limit,
        ],
    }  # fmt: skip
    if args.no_adapter:
        del legs["lm-eval -> gptjax (adapter)"]

    import jax
    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"model: GPT-2 {args.n_layer} layers x d_model {args.d_model}, {args.n_head} heads, "
        f"n_ctx {args.n_ctx}, vocab 50257, float32; 0-shot suite: {', '.join(names)}"
        f"{f' (first {limit} of each)' if args.suite_limit else ''}; "
        f"batch size {bs}; each leg a fresh process, timed end to end"
    )
    times, scores = {}, {}
    for leg, cmd in legs.items():
        slug = leg.split()[0] if "adapter" not in leg else "adapter"
        cache = work / f"cache_{slug}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: nothing from an earlier run
        env = {**os.environ, "XDG_CACHE_HOME": str(cache), "HF_DATASETS_CACHE": str(cache / "hf"),
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        for phase in ("cold", "warm"):
            out = work / f"{slug}_{phase}.json"
            seconds = run_leg(cmd(out), env, work / f"{slug}_{phase}.log")
            times[leg, phase] = seconds
            got = gptjax_scores(out) if slug == "gptjax" else lm_eval_scores(out, names)
            scores[leg, phase] = got
            print(f"  {leg:30s} {phase}: {seconds:7.1f} s", flush=True)
    ref = scores["lm-eval hf", "cold"]
    print(f"\n{'task':10s} " + " ".join(f"{m:>16s}" for m in ("metric", "lm-eval hf", "gptjax")))
    for t in names:
        for m in METRICS[t]:
            print(f"{t:10s} {m:>16s} {ref[t][m]:16.6f} {scores['gptjax', 'cold'][t][m]:16.6f}")
    lm = times["lm-eval hf", "cold"], times["lm-eval hf", "warm"]
    for leg in legs:
        if leg != "lm-eval hf":
            c, w = times[leg, "cold"], times[leg, "warm"]
            print(f"ratio {leg} / lm-eval hf (speed): first run {lm[0] / c:.2f}x, "
                  f"warm {lm[1] / w:.2f}x")  # fmt: skip
    same = all(agree(s, ref) for s in scores.values())
    print(f"scores agree: {same}")
    return 0 if same else 1
