"""`gptjax data prepare`: tokenise data.sources once, in parallel, into ArrayRecord shards.

The sources are cut into work units of about `shard_mb` MiB of input (whole files,
line-aligned byte ranges of .jsonl files, ranges of records), decided before any
tokenising; unit k becomes shard k (gptjax.data.shards). A unit is tokenised and
written by one worker on its own, so the output depends on the input alone: the same
bytes for any number of workers and for either runner (local processes, or the same
transform as an Apache Beam pipeline in gptjax.data.beam).

Atomic and resumable: everything is written into DIR.partial (plan.json first, then
each shard and, after it, its info file); DIR.partial is renamed to DIR only after
manifest.json is written, so DIR exists only when complete. A re-run after a kill
keeps the shards the same plan already finished (their digests checked) and tokenises
the rest; a re-run on a complete DIR checks every shard's digest and stops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptjax.config import Config, DataConfig
from gptjax.data import shards
from gptjax.data.sources import (
    DataError,
    Piece,
    fingerprint_sources,
    piece_documents,
    source_pieces,
)
from gptjax.tokenizer import Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_record

log = logging.getLogger(__name__)

SHARD_MB = 64  # input MiB per work unit (one shard): ~16M GPT-2 tokens, a 32 MiB file
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to tokenise any unit: picklable, the same for every unit."""

    data: DataConfig
    tokenizer_record: dict
    out_dir: str
    record_tokens: int = shards.RECORD_TOKENS


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plan_units(cfg: DataConfig, shard_mb: float = SHARD_MB) -> list[list[Piece]]:
    """Consecutive pieces grouped into units of about shard_mb MiB of input, in order."""
    limit = max(1, int(shard_mb * (1 << 20)))
    units, unit, size = [], [], 0
    for piece in source_pieces(cfg, limit):
        if unit and size + piece.size > limit:
            units.append(unit)
            unit, size = [], 0
        unit.append(piece)
        size += piece.size
    if unit:
        units.append(unit)
    return units


def info_name(index: int) -> str:
    return f"shard_{index:05d}.json"


def tokenize_unit(job: Job, index: int, pieces: list[Piece], tokenizer: Tokenizer) -> dict:
    """Tokenise one unit's documents (each non-empty one followed by EOS) into shard
    `index` under job.out_dir; writes and returns its info (its manifest entry)."""
    dtype = shards.token_dtype(tokenizer.vocab_size)
    eos = np.asarray([tokenizer.eos_id], dtype)
    stats: dict = {}
    parts, documents, empty = [], 0, 0
    for piece in pieces:
        for text in piece_documents(piece, job.data, stats):
            if not text:
                empty += 1
                continue
            parts += [np.asarray(tokenizer.encode(text), dtype), eos]
            documents += 1
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    out = Path(job.out_dir)
    info = shards.write_shard(out / shards.shard_name(index), tokens, job.record_tokens)
    info.update(
        documents=documents,
        empty_documents=empty,
        empty_files=stats.get("empty_files", []),
        replaced_undecodable=stats.get("replaced", 0),
        replaced_files=stats.get("replaced_files", {}),
    )
    _write_json(out / info_name(index), info)
    return info


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(record: dict) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer_from_record(record)


def _worker_unit(args) -> dict:
    job, index, pieces = args
    return tokenize_unit(job, index, pieces, _WORKER_TOKENIZER)


def run_local(job: Job, todo: list[tuple[int, list[Piece]]], workers: int, bar) -> None:
    """Tokenise the units in this process (workers=1) or a pool of worker processes."""
    if workers <= 1 or len(todo) <= 1:
        tokenizer = tokenizer_from_record(job.tokenizer_record)
        for index, pieces in todo:
            bar.update(tokenize_unit(job, index, pieces, tokenizer)["tokens"])
        return
    # spawn: a fork of a process that has started JAX's threads can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(todo)), _init_worker, (job.tokenizer_record,)) as pool:
        work = [(job, index, pieces) for index, pieces in todo]
        for info in pool.imap_unordered(_worker_unit, work):
            bar.update(info["tokens"])


def _plan(cfg: Config, tokenizer: Tokenizer, units, record_tokens: int) -> dict:
    return {
        "format": shards.MANIFEST_FORMAT,
        "sources": list(cfg.data.sources),
        "text_field": cfg.data.text_field,
        "sources_fingerprint": fingerprint_sources(cfg.data),
        "tokenizer_sha256": tokenizer.digest,
        "record_tokens": record_tokens,
        "units": [[dataclasses.asdict(p) for p in unit] for unit in units],
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _finished(partial: Path, index: int) -> dict | None:
    """The info of a shard an earlier run completed, if its file still matches it."""
    try:
        info = json.loads((partial / info_name(index)).read_text())
        shards.check_shards(partial, {"shards": [info]}, full=True)
        return info
    except (OSError, ValueError, KeyError, DataError):
        return None


def _tokenizer(cfg: Config) -> Tokenizer:
    if not cfg.tokenizer.path:
        raise DataError(
            "data prepare needs tokenizer.path (a SentencePiece .model, e.g. from `gptjax "
            "tokenizer train`, or a GPT-2 BPE directory with --config.tokenizer.kind=gpt2)"
        )
    try:
        return load_tokenizer(cfg.tokenizer)
    except TokenizerError as e:
        raise DataError(str(e)) from None


def _check_existing(output: Path, plan: dict) -> dict:
    manifest = shards.read_manifest(output)
    if manifest.get("plan_sha256") != _digest(plan):
        raise DataError(
            f"{output} already holds data prepared from other sources, tokenizer or "
            "settings; choose another --output or delete it"
        )
    shards.check_shards(output, manifest, full=True)
    return manifest


def prepare(
    cfg: Config,
    output: str | Path,
    workers: int | None = None,
    runner: str = "local",
    beam_options: str = "",
    shard_mb: float = SHARD_MB,
    record_tokens: int = shards.RECORD_TOKENS,
) -> dict:
    """Prepare cfg.data.sources into output (see the module docstring); its manifest."""
    output = Path(output)
    workers = workers or default_workers()
    tokenizer = _tokenizer(cfg)
    units = plan_units(cfg.data, shard_mb)
    plan = _plan(cfg, tokenizer, units, record_tokens)
    if output.exists():
        if (
            not (output / shards.MANIFEST).is_file()
            and output.is_dir()
            and not any(output.iterdir())
        ):
            output.rmdir()  # an empty directory made for us
        else:
            manifest = _check_existing(output, plan)
            log.info("%s is already prepared: %d shards match their digests", output, len(units))
            return manifest
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        try:
            same = json.loads((partial / PLAN).read_text()) == plan
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("%s is from another plan: starting again", partial)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _write_json(partial / PLAN, plan)

    done = {i: info for i in range(len(units)) if (info := _finished(partial, i))}
    todo = [(i, units[i]) for i in range(len(units)) if i not in done]
    if done:
        log.info("resuming %s: %d of %d shards already done", partial, len(done), len(units))
    job = Job(cfg.data, tokenizer.to_record(), str(partial), record_tokens)
    t0 = time.perf_counter()
    bar = tqdm(desc="tokenizing", unit=" tok", unit_scale=True, mininterval=1.0)
    try:
        if runner == "beam":
            from gptjax.data.beam import run_beam

            run_beam(job, todo, workers, beam_options, tokenize_unit)
            bar.update(
                sum(json.loads((partial / info_name(i)).read_text())["tokens"] for i, _ in todo)
            )
        elif runner == "local":
            run_local(job, todo, workers, bar)
        else:
            raise DataError(f"unknown runner {runner!r} (local or beam)")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    infos = [
        done.get(i) or json.loads((partial / info_name(i)).read_text()) for i in range(len(units))
    ]
    manifest = _manifest(plan, tokenizer, infos)
    if manifest["tokens"] == 0:
        raise DataError(f"empty corpus: sources {list(cfg.data.sources)} gave no text to tokenize")
    _report(manifest, infos, seconds, sum(infos[i]["tokens"] for i, _ in todo))
    _write_json(partial / shards.MANIFEST, manifest)
    for i in range(len(units)):
        (partial / info_name(i)).unlink()
    (partial / PLAN).unlink()
    os.rename(partial, output)
    return manifest


def _manifest(plan: dict, tokenizer: Tokenizer, infos: list[dict]) -> dict:
    replaced_files: dict = {}
    for info in infos:
        for f, n in info["replaced_files"].items():
            replaced_files[f] = replaced_files.get(f, 0) + n
    keys = ("file", "tokens", "records", "bytes", "sha256", "tokens_sha256", "documents")
    return {
        "format": shards.MANIFEST_FORMAT,
        "plan_sha256": _digest(plan),
        "sources": plan["sources"],
        "text_field": plan["text_field"],
        "sources_fingerprint": plan["sources_fingerprint"],
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "sha256": tokenizer.digest,
            "record": tokenizer.to_record(),
        },
        "dtype": shards.token_dtype(tokenizer.vocab_size).name,
        "record_tokens": plan["record_tokens"],
        "documents": sum(i["documents"] for i in infos),
        "empty_documents": sum(i["empty_documents"] for i in infos),
        "tokens": sum(i["tokens"] for i in infos),
        "stream_sha256": shards.stream_sha256(infos),
        "replaced_undecodable": sum(replaced_files.values()),
        "replaced_files": replaced_files,
        "shards": [{k: info[k] for k in keys} for info in infos],
    }


def _report(manifest: dict, infos: list[dict], seconds: float, new_tokens: int) -> None:
    for f, n in manifest["replaced_files"].items():
        log.warning("%s: %d undecodable utf-8 byte sequence(s) replaced by U+FFFD", f, n)
    empty_files = [f for info in infos for f in info["empty_files"]]
    if empty_files:
        log.warning("%d empty file(s) skipped, e.g. %s", len(empty_files), empty_files[0])
    log.info(
        "prepared %d documents (%d empty skipped), %d tokens in %d shards; %d tokens "
        "tokenised in %.1f s (%.0f tokens/s); stream sha256 %s",
        manifest["documents"], manifest["empty_documents"], manifest["tokens"],
        len(manifest["shards"]), new_tokens, seconds, new_tokens / max(seconds, 1e-9),
        manifest["stream_sha256"],
    )  # fmt: skip
