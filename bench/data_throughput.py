"""Pretraining data throughput: `gptjax data prepare` vs Hugging Face `datasets`, and
the prepared-data loader vs what one TPU v5p host consumes.

One corpus for everything: the Gutenberg books and WikiText in ../shared/data, copied
round-robin into a temp directory until it holds --mb MiB (one document per file);
one tokenizer: GPT-2 BPE (tiktoken) from ../shared/data/gpt2_bpe.

Preparation, tokens/s: gptjax with 1 and 2 worker processes (reading the files,
tokenising, writing ArrayRecord shards) against `datasets.Dataset.map(batched=True,
num_proc=N)` calling the same encode function on the same documents, already in an
in-memory Dataset (its load time is not counted, its Arrow write is). Each row shows the
1-minute load average before it: on a shared machine compare interleaved runs.

Loader, tokens/s per process: shuffled batches of GPT-3 XL windows (seq_len 2048) read
from the prepared shards by train_iterator, in process (data.workers=0) and with 2
grain workers, against one v5p host's consumption training GPT-3 XL at --mfu: 4 chips
x 459 TFLOP/s x MFU / (training FLOPs per token, gptjax.model.flops_per_token).

    python bench/data_throughput.py              # 100 MiB corpus
    python bench/data_throughput.py --mb 300 --workers 1,2,4

`datasets` is in the `reference` extra; it is imported only here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python bench/data_throughput.py`
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
V5P_PEAK, CHIPS_PER_HOST = 459e12, 4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=100, help="corpus size in MiB")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--shard-mb", type=float, default=8, help="gptjax work unit / shard size")
    p.add_argument("--mfu", type=float, default=0.55)
    p.add_argument("--batches", type=int, default=200, help="loader batches timed")
    p.add_argument("--rows", type=int, default=16, help="loader rows per batch (one process)")
    p.add_argument("--skip-hf", action="store_true", help="gptjax only")
    return p.parse_args(argv)


def make_corpus(folder: Path, mb: float) -> list[Path]:
    books = sorted((SHARED / "gutenberg").glob("*.txt")) + [SHARED / "wikitext-2" / "valid.txt"]
    out, total = [], 0
    for i, src in enumerate(itertools.cycle(books)):
        if total >= mb * (1 << 20):
            break
        dst = folder / f"doc{i:05d}.txt"
        shutil.copyfile(src, dst)
        out.append(dst)
        total += dst.stat().st_size
    return out


def bench_gptjax(cfg, out: Path, workers: int, shard_mb: float) -> tuple[float, int, str]:
    from gptjax.data.prepare import prepare

    t0 = time.perf_counter()
    manifest = prepare(cfg, out, workers=workers, shard_mb=shard_mb)
    return time.perf_counter() - t0, manifest["tokens"], manifest["stream_sha256"]


def bench_hf(files: list[Path], encode, eos: int, workers: int, cache: Path) -> tuple[float, int]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict(
        {"text": [f.read_bytes().decode("utf-8", "replace") for f in files]}
    )

    def tokenize(batch):
        return {"ids": [encode(t) + [eos] for t in batch["text"] if t]}

    t0 = time.perf_counter()
    out = ds.map(
        tokenize,
        batched=True,
        batch_size=8,
        num_proc=workers if workers > 1 else None,
        remove_columns=["text"],
        cache_file_name=str(cache / f"hf_w{workers}.arrow"),
        load_from_cache_file=False,
    )
    seconds = time.perf_counter() - t0
    return seconds, sum(len(x) for x in out["ids"])


def bench_loader(prepared: Path, seq_len: int, rows: int, batches: int, workers: int) -> float:
    from gptjax.data import TokenWindows, split_segments, train_iterator
    from gptjax.data.shards import open_prepared

    data = open_prepared(prepared)
    windows = TokenWindows(split_segments(data.segments(), 0.0)[0], seq_len, "train", "bench")
    it = train_iterator(windows, rows, seed=0, workers=workers, prefetch=4)
    for _ in range(10):  # start the workers, fill the buffers
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return batches * rows * seq_len / seconds


def v5p_host_tokens_per_s(mfu: float) -> tuple[float, float]:
    from gptjax import config as config_lib
    from gptjax import model

    cfg = config_lib.load(REPO / "configs" / "gpt3" / "xl.py")
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or 50257)
    flops = model.flops_per_token(mcfg)
    return CHIPS_PER_HOST * V5P_PEAK * mfu / flops, flops


def main(argv=None) -> None:
    args = parse_args(argv)
    from gptjax.config import Config, DataConfig, TokenizerConfig
    from gptjax.tokenizer import load_tokenizer

    workers = [int(w) for w in args.workers.split(",")]
    tcfg = TokenizerConfig(kind="gpt2", path=str(SHARED / "gpt2_bpe"))
    tok = load_tokenizer(tcfg)
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gptjax_data_bench_") as tmp:
        root = Path(tmp)
        (root / "corpus").mkdir()
        files = make_corpus(root / "corpus", args.mb)
        mib = sum(f.stat().st_size for f in files) / (1 << 20)
        print(f"corpus: {len(files)} documents, {mib:.0f} MiB (Gutenberg + WikiText, repeated)")
        cfg = dataclasses.replace(
            Config(), data=DataConfig(sources=(str(root / "corpus" / "*.txt"),)), tokenizer=tcfg
        )
        rows, digests = [], set()
        for i, w in enumerate(workers):
            load = os.getloadavg()[0]
            seconds, tokens, digest = bench_gptjax(cfg, root / f"out{i}", w, args.shard_mb)
            digests.add(digest)
            rows.append(("gptjax data prepare", w, tokens, seconds, load))
            if not args.skip_hf:
                load = os.getloadavg()[0]
                hf_s, hf_tokens = bench_hf(files, tok.encode, tok.eos_id, w, root)
                assert hf_tokens == tokens, (hf_tokens, tokens)  # the same work
                rows.append(("datasets .map", w, hf_tokens, hf_s, load))
        print(f"\npreparation ({len(digests)} distinct stream digest(s) over worker counts)")
        print(f"{'':22s}{'workers':>8s}{'tokens':>13s}{'seconds':>9s}{'tokens/s':>12s}  load")
        best: dict = {}
        for name, w, tokens, s, load in rows:
            best[name, w] = max(best.get((name, w), 0), tokens / s)
            print(f"{name:22s}{w:8d}{tokens:13,d}{s:9.1f}{tokens / s:12,.0f}  {load:.1f}")
        if not args.skip_hf:  # rows alternate gptjax, datasets: one ratio per pair
            for (_, w, _t, s, _), (_, _, _, hf_s, _) in zip(rows[::2], rows[1::2], strict=True):
                print(f"gptjax / datasets, {w} worker(s): {hf_s / s:.2f}x")
        if len(set(workers)) > 1:  # the best run of each worker count: the least disturbed
            lo, hi = min(workers), max(workers)
            for name in dict.fromkeys(n for n, *_ in rows):
                print(f"{name} scaling {lo} -> {hi} workers (best runs): "
                      f"{best[name, hi] / best[name, lo]:.2f}x")  # fmt: skip

        need, flops = v5p_host_tokens_per_s(args.mfu)
        print(f"\nloader (seq_len 2048, {args.rows} rows per batch, one process)")
        print(f"v5p host, GPT-3 XL at {args.mfu:.0%} MFU: {CHIPS_PER_HOST} x {V5P_PEAK:.3g} x "
              f"{args.mfu} / {flops:.4g} FLOPs/token = {need:,.0f} tokens/s")  # fmt: skip
        for w in (0, 2):
            load = os.getloadavg()[0]
            got = bench_loader(root / "out0", 2048, args.rows, args.batches, w)
            print(f"data.workers={w}: {got:,.0f} tokens/s = {got / need:.1f}x a v5p host "
                  f"(load {load:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
