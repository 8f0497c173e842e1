"""`gptjax data prepare` and training on prepared:DIR: identical output for any worker
count and for the Beam runner, atomic resumable writes, bad input, the packing shared
with the token cache, grain workers, and a resume across process counts."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_multihost import config_flags, curves, local

import gptjax.data.prepare as prepare_mod
from gptjax import cli
from gptjax.config import Config, DataConfig, ModelConfig, TokenizerConfig
from gptjax.data import DataError, TokenWindows, load_splits, split_segments, train_iterator
from gptjax.data.shards import open_prepared
from gptjax.data.sources import iter_documents
from gptjax.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2(shared_data) -> TokenizerConfig:
    return TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe"))


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, shared_data) -> tuple[str, ...]:
    """Text files, a .jsonl large enough to be cut into several byte ranges, builtin."""
    root = tmp_path_factory.mktemp("corpus")
    lines = [
        json.dumps({"text": f"Record {i}: " + "words and more words. " * (i % 7)})
        for i in range(3000)
    ]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(shared_data / "gutenberg" / "pg11.txt", root / "a.txt")
    shutil.copy(shared_data / "gutenberg" / "pg5200.txt", root / "b.txt")
    return (str(root / "*.txt"), str(root / "rows.jsonl"), "builtin:pydoc")


def make_cfg(sources, tokenizer: TokenizerConfig, seq_len: int = 64) -> Config:
    return dataclasses.replace(
        Config(),
        data=DataConfig(sources=tuple(sources), val_fraction=0.1),
        tokenizer=tokenizer,
        model=ModelConfig(seq_len=seq_len),
    )


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def stream(path: Path) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in open_prepared(path).segments()])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mixed_corpus, gpt2) -> Path:
    out = tmp_path_factory.mktemp("prep") / "one"
    prepare_mod.prepare(make_cfg(mixed_corpus, gpt2), out, workers=1, shard_mb=0.1)
    return out


def test_the_stream_is_every_document_then_eos_in_order(prepared, mixed_corpus, gpt2):
    tok = load_tokenizer(gpt2)
    docs = list(iter_documents(DataConfig(sources=mixed_corpus)))
    want = np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs if d])
    np.testing.assert_array_equal(stream(prepared), want)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["documents"] == len(docs) and manifest["tokens"] == len(want)
    assert len(manifest["shards"]) > 3  # the .jsonl file was cut into several units
    assert manifest["tokenizer"]["sha256"] == tok.digest


def test_two_workers_give_the_same_bytes(prepared, mixed_corpus, gpt2, tmp_path):
    prepare_mod.prepare(make_cfg(mixed_corpus, gpt2), tmp_path / "two", workers=2, shard_mb=0.1)
    assert tree(tmp_path / "two") == tree(prepared)


def test_beam_direct_runner_gives_the_same_bytes(prepared, mixed_corpus, gpt2, tmp_path):
    pytest.importorskip("apache_beam", reason="the `beam` extra (apache-beam) is not installed")
    cfg = make_cfg(mixed_corpus, gpt2)
    prepare_mod.prepare(cfg, tmp_path / "beam", workers=2, runner="beam", shard_mb=0.1)
    assert tree(tmp_path / "beam") == tree(prepared)


def test_runner_beam_without_the_extra_is_one_clear_line(tmp_path, gpt2):
    """apache_beam made unimportable in a child process: exit 2, one line, no traceback."""
    code = (
        "import sys; sys.modules['apache_beam'] = None; from gptjax import cli; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    args = ["data", "prepare", "--config", str(REPO / "configs/quickstart.py"), "--output",
            str(tmp_path / "out"), "--runner", "beam", f"--config.tokenizer.kind={gpt2.kind}",
            f"--config.tokenizer.path={gpt2.path}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("gptjax:")]
    assert errors == ["gptjax: --runner beam needs Apache Beam, which is not installed: "
                      "pip install 'gptjax[beam]' (or use --runner local)"], out.stderr  # fmt: skip
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_a_failed_prepare_leaves_nothing_complete_and_resumes(
    prepared, mixed_corpus, gpt2, tmp_path, monkeypatch
):
    cfg, out = make_cfg(mixed_corpus, gpt2), tmp_path / "out"
    real = prepare_mod.tokenize_unit

    def crash_on_third(job, index, pieces, tokenizer):
        if index == 2:
            raise RuntimeError("killed")
        return real(job, index, pieces, tokenizer)

    monkeypatch.setattr(prepare_mod, "tokenize_unit", crash_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_mod.prepare(cfg, out, workers=1, shard_mb=0.1)
    partial = tmp_path / "out.partial"
    assert not out.exists() and not (partial / "manifest.json").exists()
    assert (partial / "shard_00001.json").is_file()
    # A torn shard left behind is tokenised again, the finished one is kept.
    (partial / "shard_00001.arrayrecord").write_bytes(b"torn")
    monkeypatch.setattr(prepare_mod, "tokenize_unit", real)
    kept = (partial / "shard_00000.arrayrecord").stat().st_mtime_ns
    prepare_mod.prepare(cfg, out, workers=1, shard_mb=0.1)
    assert tree(out) == tree(prepared) and not partial.exists()
    assert (out / "shard_00000.arrayrecord").stat().st_mtime_ns == kept
    # A re-run on the complete directory checks it and changes nothing.
    assert prepare_mod.prepare(cfg, out, workers=1, shard_mb=0.1)["tokens"] > 0


def test_torn_or_altered_shards_are_detected(prepared, mixed_corpus, gpt2, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "shard_00002.arrayrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=r"shard shard_00002.arrayrecord has \d+ bytes, the manifest"
    ):
        open_prepared(copy)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(DataError, match="shard_00002.arrayrecord does not match its sha256"):
        prepare_mod.prepare(make_cfg(mixed_corpus, gpt2), copy, workers=1, shard_mb=0.1)


def test_bad_sources_are_reported(tmp_path, gpt2, caplog):
    cfg = make_cfg([str(tmp_path / "missing.txt")], gpt2)
    with pytest.raises(DataError, match="missing.txt'?: file not found"):
        prepare_mod.prepare(cfg, tmp_path / "o1")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xff and \xfe more text")
    cfg = make_cfg([str(tmp_path / "*.txt")], gpt2)
    with caplog.at_level("INFO"):
        manifest = prepare_mod.prepare(cfg, tmp_path / "o2", workers=1)
    assert manifest["replaced_files"] == {str(tmp_path / "latin1.txt"): 2}
    assert manifest["empty_documents"] == 1 and manifest["documents"] == 1
    assert f"{tmp_path / 'latin1.txt'}: 2 undecodable" in caplog.text
    assert f"1 empty file(s) skipped, e.g. {tmp_path / 'empty.txt'}" in caplog.text
    (tmp_path / "latin1.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        prepare_mod.prepare(cfg, tmp_path / "o3", workers=1)
    assert not (tmp_path / "o3").exists()


def test_prepared_windows_are_the_token_cache_windows(tmp_path, shared_data, gpt2):
    """One packing: a one-shard prepared directory and the token cache give equal windows."""
    sources = [str(shared_data / "gutenberg" / "pg11.txt")]
    cfg = make_cfg(sources, gpt2, seq_len=32)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "c"))
    )
    prepare_mod.prepare(cfg, tmp_path / "p", workers=1)
    tok = load_tokenizer(gpt2)
    cached = load_splits(cfg, tok, tmp_path)
    prep_cfg = dataclasses.replace(
        cfg, data=DataConfig(sources=(f"prepared:{tmp_path / 'p'}",), val_fraction=0.1)
    )
    from_prepared = load_splits(prep_cfg, tok, tmp_path)
    for a, b in zip(cached, from_prepared, strict=True):
        assert len(a) == len(b) > 0
        for i in (0, 1, len(a) // 2, len(a) - 1):
            np.testing.assert_array_equal(a[i], b[i])


def test_training_refuses_data_from_another_tokenizer(prepared, sp_model, tmp_path, capsys):
    argv = ["train", "--config", str(REPO / "configs/quickstart.py"),
            "--workdir", str(tmp_path / "run"), f"--config.data.sources=prepared:{prepared}",
            f"--config.tokenizer.path={sp_model}"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "was tokenised with gpt2 (vocab 50257" in err, err
    assert "this run's tokenizer is sentencepiece (vocab 512" in err and "Traceback" not in err


def test_prepared_must_be_the_only_source(prepared, gpt2):
    cfg = make_cfg([f"prepared:{prepared}", "builtin:pydoc"], gpt2)
    with pytest.raises(DataError, match="must be the only one"):
        load_splits(cfg, load_tokenizer(gpt2), Path("."))


def test_grain_workers_give_the_in_process_batches_and_resume(prepared):
    segments = split_segments(open_prepared(prepared).segments(), 0.1)[0]
    windows = TokenWindows(segments, 64, "train", "t")
    ref, pooled = (
        train_iterator(windows, 8, 3),
        train_iterator(windows, 8, 3, workers=2, prefetch=2),
    )
    try:
        first = [next(ref) for _ in range(6)]
        for want in first[:3]:
            np.testing.assert_array_equal(next(pooled), want)
        state = pooled.get_state()
        assert state["position"] == 24
        resumed = train_iterator(windows, 8, 3, workers=1)
        resumed.set_state(state)
        for want in first[3:]:
            np.testing.assert_array_equal(next(resumed), want)
        resumed.close()
    finally:
        pooled.close()


def test_resume_across_process_counts_on_prepared_data(tmp_path, sp_model, corpus, token_cache):
    """Checkpointed on 2 processes, resumed on 1, checkpointed, resumed on 2: the losses of
    the uninterrupted 2-process run, bitwise (the same mesh; see test_multihost)."""
    cfg = make_cfg([str(corpus)], TokenizerConfig(path=str(sp_model)))
    prepare_mod.prepare(cfg, tmp_path / "prep", workers=2, shard_mb=0.25)
    flags = [f for f in config_flags(sp_model, corpus, token_cache) if "data.sources" not in f]
    flags += [f"--config.data.sources=prepared:{tmp_path / 'prep'}", "--config.data.workers=1",
              "--config.train.steps=12", "--config.optim.decay_steps=12"]  # fmt: skip
    local(2, 4, tmp_path / "ref", flags)
    want = curves(tmp_path / "ref")
    assert sorted(want) == list(range(1, 13))
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    for step in (8, 12):
        shutil.rmtree(run / "checkpoints" / str(step))
    local(1, 8, run, [*flags, "--config.train.steps=8"])  # 2 -> 1 process
    local(2, 4, run, flags)  # 1 -> 2 processes
    assert curves(run) == want


def test_cli_data_prepare_prints_the_digest(prepared, mixed_corpus, gpt2, tmp_path, capsys):
    argv = ["data", "prepare", "--config", str(REPO / "configs/quickstart.py"), "--output",
            str(tmp_path / "cli"), "--workers", "1", "--shard-mb", "0.1",
            f"--config.data.sources={','.join(mixed_corpus)}",
            f"--config.tokenizer.kind={gpt2.kind}",
            f"--config.tokenizer.path={gpt2.path}"]  # fmt: skip
    assert cli.main(argv) == 0
    digest = json.loads((prepared / "manifest.json").read_text())["stream_sha256"]
    assert f"stream sha256 {digest}" in capsys.readouterr().out
    assert cli.main([*argv[:-2], "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_a_tfds_split_is_cut_into_record_ranges(tmp_path, gpt2):
    import tensorflow_datasets as tfds

    texts = [f"record {i}: caf\u00e9 " + "word " * i for i in range(5)]

    class GptjaxPrepareCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, t in enumerate(texts):
                yield i, {"text": t}

    GptjaxPrepareCorpus(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = make_cfg(["tfds:gptjax_prepare_corpus"], gpt2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tfds_data_dir=str(tmp_path)))
    # 8 KiB units at an assumed 4 KiB per record: 2 records per unit, 3 units.
    manifest = prepare_mod.prepare(cfg, tmp_path / "p", workers=1, shard_mb=8 / 1024)
    assert len(manifest["shards"]) == 3 and manifest["documents"] == 5
    tok = load_tokenizer(gpt2)
    want = [t for d in iter_documents(cfg.data) for t in tok.encode(d) + [tok.eos_id]]
    np.testing.assert_array_equal(stream(tmp_path / "p"), want)


def test_a_killed_prepare_resumes_to_the_same_bytes(prepared, mixed_corpus, gpt2, tmp_path):
    """kill -9 once two shards are done: no DIR, a DIR.partial without a manifest; the
    re-run keeps the finished shards and ends with the uninterrupted run's bytes."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "gptjax", "data", "prepare", "--config",
            str(REPO / "configs/quickstart.py"), "--output", str(out), "--workers", "1",
            "--shard-mb", "0.1", f"--config.data.sources={','.join(mixed_corpus)}",
            f"--config.tokenizer.kind={gpt2.kind}", f"--config.tokenizer.path={gpt2.path}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    done = tmp_path / "out.partial" / "shard_00001.json"
    while not done.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not out.exists() and not (tmp_path / "out.partial" / "manifest.json").exists()
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" in rerun.stderr and "shards already done" in rerun.stderr
    assert tree(out) == tree(prepared)
