"""gptjax.eval: exact scoring, loaders, few-shot, metrics, harness outputs, bad input, mesh."""

import dataclasses
import json
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cli, model, xla_cpu
from gptjax.config import MeshConfig, TokenizerConfig
from gptjax.eval import fewshot, harness, loaders, metrics, score_program, tasks
from gptjax.eval.buckets import fit_shapes
from gptjax.eval.scoring import (
    EvalModel,
    encode_pair,
    length_bucket,
    pack_rows,
    rolling_windows,
)
from gptjax.eval.tasks import EvalInputError, Example
from gptjax.tokenizer import load_tokenizer

N_CTX = 64


def cli_main(argv):
    """`gptjax eval ARGV`."""
    return cli.main(["eval", *argv])


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe")))


@pytest.fixture(scope="module")
def ckpt(gpt2_checkpoint):
    return gpt2_checkpoint(seq_len=N_CTX, n_layer=2)


@pytest.fixture(scope="module")
def em(ckpt):
    return EvalModel.load(ckpt, batch_size=8)


def _reference_ll(em, ctx, cont):
    """Independent full forward pass: log_softmax of model.apply, gathered. The input is
    right-padded to N_CTX (one compiled shape; causal, so padding after a position
    never changes it: test_model's causality test)."""
    tokens = (list(ctx) + list(cont))[-(N_CTX + 1) :]
    inputs = jnp.asarray([tokens[:-1] + [0] * (N_CTX + 1 - len(tokens))])
    graphdef, _ = model.abstract_model(em.cfg)
    logits = model.apply(graphdef, em.scorer.params, inputs)[0, :, : em.cfg.vocab_size]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    n = len(cont)
    positions = np.arange(len(tokens) - 1 - n, len(tokens) - 1)
    picked = logp[positions, np.asarray(cont)]
    greedy = bool(np.all(logp[positions].argmax(-1) == np.asarray(cont)))
    return float(picked.sum()), greedy


def _hellaswag(shared_data, n=6):
    return loaders.load_hellaswag(shared_data / "hellaswag" / "hellaswag_val_first200.txt")[:n]


# ----------------------------------------------------------------------------- scoring


def test_multiple_choice_loglikelihood_equals_full_forward(em, shared_data):
    examples = _hellaswag(shared_data)
    pairs = [r for ex in examples for r in ex.requests()]
    pairs.append(("", " an empty context is EOS"))  # lm-eval: [EOS] + continuation
    got = em.loglikelihood(pairs)
    for (ctx_text, cont_text), (ll, greedy, n) in zip(pairs, got, strict=True):
        ctx, cont = encode_pair(em.tokenizer, ctx_text, cont_text)
        want, want_greedy = _reference_ll(em, ctx, cont)
        assert n == len(cont)
        assert abs(ll - want) < 1e-5, (ctx_text[:40], ll, want)
        assert greedy == want_greedy


def test_packed_continuations_match_full_forward_with_a_band_gqa_and_rope(em, shared_data):
    """Each option is a segment of one packed chunk: with GPT-3's local band (each
    segment's window must start at its own position, not after the other options), GQA,
    RoPE and an unpadded 50257 vocabulary (29 strided LM-head chunks of 1733 entries),
    every option's loglikelihood still equals a full forward pass of it alone."""
    cfg = dataclasses.replace(
        em.cfg, attention_windows=(0, 5), n_kv_head=2, position="rope", vocab_multiple=1
    )
    assert score_program.vocab_chunks(cfg.padded_vocab) == 29
    params = model.init_params(cfg, jax.random.key(1))
    banded = EvalModel.from_params(cfg, params, em.tokenizer, batch_size=8)
    pairs = [r for ex in _hellaswag(shared_data, 4) for r in ex.requests()]
    pairs += [("One context,", " a"), ("One context,", " two options of other lengths")]
    got = banded.loglikelihood(pairs)
    for (ctx_text, cont_text), (ll, greedy, _) in zip(pairs, got, strict=True):
        ctx, cont = encode_pair(em.tokenizer, ctx_text, cont_text)
        want, want_greedy = _reference_ll(banded, ctx, cont)
        assert abs(ll - want) < 1e-5, (ctx_text[:40], cont_text, ll, want)
        assert greedy == want_greedy
    # The program GPU/TPU get (no XLA:CPU forms: each layer's weights sliced inside the
    # layer loop, not split per window before it) scores the same.
    with xla_cpu.portable_lowering():
        portable = EvalModel.from_params(cfg, params, em.tokenizer, batch_size=8)
        for (a, ga, _), (b, gb, _) in zip(got, portable.loglikelihood(pairs), strict=True):
            assert abs(a - b) < 1e-5 and ga == gb


def test_bucketing_and_batching_do_not_change_any_number(em, shared_data):
    """Different batch sizes put requests in different buckets / rows / padding."""
    pairs = [r for ex in _hellaswag(shared_data, 10) for r in ex.requests()]
    pairs += [("A", " b"), ("x " * 40, " long context, cut from the left to fit n_ctx")]
    big = em.loglikelihood(pairs)
    small = EvalModel.from_params(em.cfg, em.scorer.params, em.tokenizer, batch_size=3)
    for (a, ga, na), (b, gb, nb) in zip(big, small.loglikelihood(pairs), strict=True):
        assert abs(a - b) < 1e-5 and ga == gb and na == nb
    ctx, cont = encode_pair(em.tokenizer, *pairs[-1])
    assert abs(big[-1][0] - _reference_ll(em, ctx, cont)[0]) < 1e-5


def test_few_shapes_per_task_change_no_number(em, shared_data):
    """One new compiled shape for a whole task (every batch padded up to it) or one per
    need: the same loglikelihoods, and the second call reuses the first's shapes."""
    pairs = [r for ex in _hellaswag(shared_data, 12) for r in ex.requests()]
    pairs += [("A", " b"), ("x " * 30, " a longer continuation than the others here")]
    kw = {"batch_size": 4}
    tight = EvalModel.from_params(em.cfg, em.scorer.params, em.tokenizer, compile_cost=0.0, **kw)
    one = EvalModel.from_params(em.cfg, em.scorer.params, em.tokenizer, compile_cost=1e9, **kw)
    want = tight.loglikelihood(pairs)
    assert len(tight.scorer.shapes) > 1  # the requests do need several shapes
    for (a, ga, na), (b, gb, nb) in zip(want, one.loglikelihood(pairs), strict=True):
        assert abs(a - b) < 1e-5 and ga == gb and na == nb
    assert len(one.scorer.shapes) == 1
    one.loglikelihood(pairs[:3])  # smaller needs: covered by the compiled shape
    assert len(one.scorer.shapes) == 1


def test_requests_share_rows_and_score_as_if_alone(em, shared_data):
    """Short requests (one-token options, HellaSwag endings) are packed several to a row
    of n_ctx tokens, with little padding, and each scores as a forward pass of it alone."""
    contexts = [f"Review {i}: the movie was {'great' * i}.\nAnswer:" for i in range(10)]
    pairs = [(ctx, opt) for ctx in contexts for opt in (" True", " False")]
    pairs += [r for ex in _hellaswag(shared_data, 8) for r in ex.requests()]
    fresh = EvalModel.from_params(em.cfg, em.scorer.params, em.tokenizer, batch_size=8)
    encoded = [fresh.encode_pair(c, x) for c, x in pairs]
    _, batches = fresh.scorer.batches(encoded)
    rows = [row for batch in batches for row in batch]
    used = sum(gr.size for row in rows for gr in row)
    assert all(sum(gr.size for gr in row) <= N_CTX for row in rows)
    assert max(len(row) for row in rows) >= 3  # several questions share a row
    assert used >= 0.8 * len(rows) * N_CTX  # little padding
    got = fresh.loglikelihood(pairs)
    for (c, x), (ll, greedy, _) in zip(pairs, got, strict=True):
        want, want_greedy = _reference_ll(em, *encode_pair(em.tokenizer, c, x))
        assert abs(ll - want) < 1e-5 and greedy == want_greedy


def test_pack_rows_best_fit():
    sizes = [5, 9, 3, 7, 1, 4, 6, 2, 8, 5]
    rows = pack_rows(sizes, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 50 in rows of 10: no row wasted
    assert rows == pack_rows(sizes, 10)  # deterministic
    assert pack_rows([10, 10], 10) == [[0], [1]]


def test_fit_shapes_covers_every_need_with_few_shapes():
    needs = [(16, 24, 32)] * 5 + [(16, 32, 128)] * 3 + [(8, 16, 16), (16, 24, 384), (16, 96, 8)]
    for max_new in (1, 2, 3):
        got = fit_shapes(needs, max_new=max_new)
        assert len(got) == len(needs)
        assert all(all(x >= y for x, y in zip(s, n)) for s, n in zip(got, needs))  # noqa: B905
        assert len(set(got)) <= max_new
    assert fit_shapes(needs) == needs  # compiles cost nothing: no padding
    assert len(set(fit_shapes(needs, compile_cost=1e9))) == 1  # compiles cost everything
    # A compiled shape is reused where the padding costs less than a compile.
    known = [(16, 32, 48), (16, 24, 384)]
    assert fit_shapes([(16, 24, 32)], known, compile_cost=1000) == [(16, 32, 48)]
    assert fit_shapes([(16, 24, 32)], known, compile_cost=100) == [(16, 24, 32)]
    # Dearer compiles, fewer shapes and more padding: rows x (context + chunk).
    runs = [fit_shapes(needs, compile_cost=c) for c in (0, 300, 3000, 30000)]
    padded = [sum(g * (p + t) for g, p, t in run) for run in runs]
    assert padded == sorted(padded) and padded[0] < padded[-1]
    assert [len(set(run)) for run in runs] == sorted((len(set(r)) for r in runs), reverse=True)


def test_rolling_loglikelihood_over_texts_longer_than_n_ctx(em, shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:900]
    ids = em.tokenizer.encode(text)
    assert len(ids) > 2 * N_CTX
    [(ll, n)] = em.rolling([text])
    # Reference from the definition: disjoint blocks of n_ctx predictions, each given as
    # much of the preceding text as fits (the first one EOS), one full forward each.
    stream = [em.tokenizer.eos_id] + ids
    want = 0.0
    for s in range(0, len(ids), N_CTX):
        want += _reference_ll(em, stream[: s + 1], ids[s : s + N_CTX])[0]
    assert n == len(ids)
    assert abs(ll - want) < 1e-5 * max(1, len(ids) / N_CTX)
    # lm-eval's window layout, with the same context_len=1.
    windows = rolling_windows(ids, 0, N_CTX)
    assert sum(len(c) for _, c in windows) == len(ids)
    assert all(len(a) + len(b) - 1 <= N_CTX for a, b in windows)


def test_length_buckets_are_few():
    sizes = {length_bucket(n) for n in range(1, 2049)}
    assert sizes == {8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048}


def test_greedy_generation_matches_generate_ids(em):
    from gptjax.generate import Sampling, generate_ids

    texts = em.generate(["The king", "Once upon a time, there"], until=["\n\n"], max_new=5)
    ids = generate_ids(
        em.scorer.graphdef,
        em.scorer.params,
        em.cfg,
        [em.tokenizer.encode("The king"), em.tokenizer.encode("Once upon a time, there")],
        Sampling(temperature=0.0, max_new_tokens=5, stop_ids=(em.tokenizer.eos_id,)),
    )
    assert texts == [em.tokenizer.decode(i).split("\n\n")[0] for i in ids]


def test_sharded_evaluation_matches_one_device(ckpt, em, shared_data):
    from gptjax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    sharded = EvalModel.load(ckpt, mesh=mesh, batch_size=8)
    wq = sharded.scorer.params["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    pairs = [r for ex in _hellaswag(shared_data, 4) for r in ex.requests()]
    for (a, ga, _), (b, gb, _) in zip(
        em.loglikelihood(pairs), sharded.loglikelihood(pairs), strict=True
    ):
        assert abs(a - b) < 1e-5 and ga == gb


# ----------------------------------------------------------------------------- loaders


def test_shared_file_loaders(shared_data):
    hs = loaders.load_hellaswag(shared_data / "hellaswag" / "hellaswag_val_first200.txt")
    assert len(hs) == 200 and hs[0].gold == 3 and len(hs[0].choices) == 4
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs[0].requests()[0][1] == " " + hs[0].choices[0]
    piqa = loaders.load_piqa(shared_data / "piqa" / "valid_first200.jsonl")
    assert len(piqa) == 200 and [e.gold for e in piqa[:3]] == [0, 1, 1]
    assert piqa[0].context.startswith("Question: How do I ready a guinea pig") and piqa[
        0
    ].context.endswith("\nAnswer:")
    glue = loaders.load_sst2(shared_data / "sst2" / "glue_sst2_dev.tsv")
    stsa = loaders.load_sst2(shared_data / "sst2" / "stsa.binary.dev")
    assert len(glue) == len(stsa) == 872 and glue[0].gold == 1 and stsa[0].gold == 0
    assert glue[0].choices == ("negative", "positive")
    # lm-eval's sst2 prompt on GLUE's row, whose sentence ends in a space.
    assert glue[0].context == (
        "it 's a charming and often affecting journey . \n"
        "Question: Is this sentence positive or negative?\nAnswer:"
    )
    rte = loaders.load_rte(shared_data / "rte" / "val.jsonl")
    assert (
        len(rte) == 277 and rte[0].choices == ("True", "False") and {e.gold for e in rte} == {0, 1}
    )
    cb = loaders.load_cb(shared_data / "cb" / "val.jsonl")
    assert len(cb) == 56 and {e.gold for e in cb} == {0, 1, 2}
    wiki = loaders.load_wikitext(shared_data / "wikitext-2" / "valid.txt")
    assert len(wiki) > 20 and wiki[0].kind == "rolling"
    # Bytes (byte_perplexity, bits_per_byte) of the page as released, as lm-eval counts
    # them, not of the detokenised text that is scored.
    page = loaders.wikitext_pages(shared_data / "wikitext-2" / "valid.txt")[0][1]
    assert wiki[0].n_bytes == len(page.encode()) > len(wiki[0].target.encode())
    assert (
        wiki[0].target.lstrip().startswith("= Homarus gammarus =") and " @-@ " not in wiki[0].target
    )


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_fixture_format_loaders(tmp_path):
    j = json.dumps
    lam = loaders.load_lambada(
        _write(tmp_path / "lambada_test.jsonl", [j({"text": "he opened the door"})])
    )
    assert lam[0].requests() == [("he opened the", " door")]

    hs = loaders.load_hellaswag(_write(tmp_path / "hellaswag_val.jsonl", [j({
        "activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "then she",
        "endings": ["bakes [title] it.", "b", "c", "d"], "label": 0})]))  # fmt: skip
    assert (
        hs[0].context == "Baking: She mixes the flour. Then she"
        and hs[0].choices[0] == "bakes. it."
    )

    arc_orig = {"id": "x", "question": {"stem": "What is hot?", "choices": [
        {"text": "ice", "label": "A"}, {"text": "fire", "label": "B"}]}, "answerKey": "B"}  # fmt: skip
    arc_flat = {
        "question": "What is hot?",
        "choices": {"text": ["ice", "fire"], "label": ["1", "2"]},
        "answerKey": "2",
    }
    common = {"query": "Question: What is hot?\nAnswer:", "choices": ["ice", "fire"], "gold": 1}
    arc = loaders.load_arc(
        _write(tmp_path / "ARC-Easy-Test.jsonl", [j(arc_orig), j(arc_flat), j(common)])
    )
    assert {(e.context, e.choices, e.gold, e.uncond_context) for e in arc} == {
        ("Question: What is hot?\nAnswer:", ("ice", "fire"), 1, "Answer:")
    }

    wg = loaders.load_winogrande(_write(tmp_path / "dev.jsonl", [j({
        "sentence": "The cup fell off the table because _ was unstable.",
        "option1": "the cup", "option2": "the table", "answer": "2"})]))  # fmt: skip
    assert wg[0].partial and wg[0].gold == 1
    assert wg[0].option(1) == ("The cup fell off the table because the table", " was unstable.")

    copa = loaders.load_copa(_write(tmp_path / "copa.jsonl", [j({
        "premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
        "choice2": "He got a hole in his sock.", "question": "cause", "label": 0})]))  # fmt: skip
    assert copa[0].option(0) == (
        "The man broke his toe because",
        " he dropped a hammer on his foot.",
    )

    boolq = loaders.load_boolq(
        _write(tmp_path / "boolq.jsonl", [j({"question": "is it", "passage": "P.", "label": True})])
    )
    assert boolq[0].context == "P.\nQuestion: is it?\nAnswer:" and boolq[0].gold == 1

    header = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding"
    sc = loaders.load_storycloze(
        _write(tmp_path / "cloze.csv", [header, "id1,A.,B.,C.,D.,Good end.,Bad end.,1"])
    )
    assert (
        sc[0].context == "A. B. C. D."
        and sc[0].choices == ("Good end.", "Bad end.")
        and sc[0].gold == 0
    )

    mc = loaders.load_generic_mc(
        _write(tmp_path / "mc.jsonl", [j({"context": "Q", "choices": ["a", "b"], "gold": 1})])
    )
    assert mc[0].requests() == [("Q", " a"), ("Q", " b")]
    lm = loaders.load_generic_lm(_write(tmp_path / "lm.jsonl", [j({"text": "one two three"})]))
    assert lm[0].kind == "rolling" and lm[0].words == 3


def test_partial_and_unconditional_scoring_match_independent_forward_passes(em, tmp_path):
    """Winogrande's partial scoring (the shared continuation after each filled-in blank)
    and ARC's unconditional normalisation (ll(option | question) - ll(option | "Answer:")),
    end to end through resolve_task + evaluate_task, against full forward passes."""
    j = json.dumps
    wg_docs = [
        ("The cup fell off the table because _ was unstable.", "the cup", "the table", "2"),
        ("Anna gave Maria a book because _ had finished it.", "Anna", "Maria", "1"),
        ("The suitcase did not fit in the car because _ was too big.", "the suitcase",
         "the car", "1"),
    ]  # fmt: skip
    wg_path = _write(tmp_path / "dev.jsonl", [
        j({"sentence": s, "option1": a, "option2": b, "answer": ans}) for s, a, b, ans in wg_docs
    ])  # fmt: skip
    arc_docs = [
        ("What is hot?", ["ice", "fire", "snow"], "B"),
        ("Which one is a planet?", ["Mars", "a chair", "water"], "A"),
        ("What do plants need to grow?", ["sunlight", "plastic", "noise"], "A"),
    ]
    arc_path = _write(tmp_path / "ARC-Easy-Test.jsonl", [
        j({"id": f"q{i}", "question": {"stem": q, "choices": [
            {"text": t, "label": "ABC"[c]} for c, t in enumerate(opts)]}, "answerKey": key})
        for i, (q, opts, key) in enumerate(arc_docs)
    ])  # fmt: skip

    def ref(ctx_text, cont_text):
        return _reference_ll(em, *encode_pair(em.tokenizer, ctx_text, cont_text))[0]

    opts = harness.RunOptions()
    wg_result, wg_samples = harness.evaluate_task(
        em, tasks.resolve_task(f"winogrande={wg_path}"), 0, opts
    )
    correct = []
    for (sentence, a, b, ans), sample in zip(wg_docs, wg_samples, strict=True):
        head, tail = sentence.split("_")
        want = [ref(head + option, " " + tail.strip()) for option in (a, b)]
        np.testing.assert_allclose(sample["loglikelihoods"], want, atol=1e-5)
        assert sample["pred"]["acc"] == int(np.argmax(want))
        correct.append(float(np.argmax(want) == int(ans) - 1))
    assert wg_result["metrics"]["acc"]["value"] == pytest.approx(np.mean(correct))

    arc_result, arc_samples = harness.evaluate_task(
        em, tasks.resolve_task(f"arc_easy={arc_path}"), 0, opts
    )
    correct = []
    for (question, options, key), sample in zip(arc_docs, arc_samples, strict=True):
        cond = [ref(f"Question: {question}\nAnswer:", " " + o) for o in options]
        uncond = [ref("Answer:", " " + o) for o in options]
        np.testing.assert_allclose(sample["loglikelihoods"], cond, atol=1e-5)
        np.testing.assert_allclose(sample["uncond_loglikelihoods"], uncond, atol=1e-5)
        pred = int(np.argmax(np.subtract(cond, uncond)))
        assert sample["pred"]["acc_uncond"] == pred
        correct.append(float(pred == "ABC".index(key)))
    assert arc_result["primary"] == "acc_uncond"
    assert arc_result["metrics"]["acc_uncond"]["value"] == pytest.approx(np.mean(correct))


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_task_definition_as_data(tmp_path, fmt):
    _write(tmp_path / "data.jsonl", [json.dumps({"goal": "g", "a": "x", "b": "y", "label": "B"})])
    spec = {"kind": "mc", "data": "data.jsonl", "context": "Goal: {goal}\nAnswer:",
            "choices": ["{a}", "{b}"], "gold": "{label}", "gold_map": {"A": 0, "B": 1},
            "primary": "acc_norm"}  # fmt: skip
    if fmt == "yaml":
        import yaml

        (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    else:
        (tmp_path / "task.json").write_text(json.dumps(spec))
    task = tasks.resolve_task(f"mytask={tmp_path / f'task.{fmt}'}")
    assert task.primary == "acc_norm"
    assert task.examples[0].requests() == [("Goal: g\nAnswer:", " x"), ("Goal: g\nAnswer:", " y")]
    assert task.examples[0].gold == 1
    # Templates substitute fields and nothing else: no attribute access, no code.
    spec["context"] = "{goal.__class__}"
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    assert (
        tasks.resolve_task(f"t={tmp_path / 'bad.json'}").examples[0].context == "{goal.__class__}"
    )


def test_tfds_name_alone_reads_a_real_prepared_dataset(shared_data, tmp_path):
    """TFDS's own PIQA builder, fed the shared PIQA slice instead of its download URL,
    prepares array_record files; `piqa` (no PATH) must then load them through
    tfds.data_source with the same examples as the original files give."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.piqa import piqa_dataset_builder

    valid = shared_data / "piqa" / "valid_first200.jsonl"
    labels = shared_data / "piqa" / "valid-labels_first200.lst"
    # The original distribution's records carry an id, which the shared slice dropped.
    records = [{**json.loads(line), "id": f"v{i}"} for i, line in enumerate(valid.open())]
    label_lines = labels.read_text().splitlines()
    for split, n in (("train", 20), ("dev", 200)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:n]))
        (tmp_path / f"{split}-labels.lst").write_text("\n".join(label_lines[:n]) + "\n")

    class LocalPiqa(piqa_dataset_builder.Builder, skip_registration=True):
        name = "piqa"
        __module__ = piqa_dataset_builder.__name__  # its metadata files live there

        def _split_generators(self, dl_manager):
            return {
                name: self._generate_examples(tmp_path / f"{split}.jsonl",
                                              tmp_path / f"{split}-labels.lst")
                for name, split in (("train", "train"), ("validation", "dev"))
            }  # fmt: skip

    data_dir = tmp_path / "tfds"
    LocalPiqa(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path))
    )
    task = tasks.resolve_task("piqa", tfds_data_dir=str(data_dir), tmp_dir=tmp_path)
    assert task.source == "tfds:piqa/validation" and task.fewshot_source == "tfds:piqa/train"
    from_files = tasks.resolve_task(f"piqa={valid}")

    def key(e):
        return e.context, tuple(e.choices), e.gold

    assert len(task.examples) == len(from_files.examples) == 200
    assert sorted(map(key, task.examples)) == sorted(map(key, from_files.examples))
    assert len(task.fewshot_pool) == 20
    with pytest.raises(EvalInputError, match="needs a data file"):
        tasks.resolve_task("wikitext")
    with pytest.raises(EvalInputError, match="hellaswag"):
        tasks.resolve_task("hellaswag", tfds_data_dir=str(data_dir))  # not prepared there


LAMBADA_DEV = [
    "she put the kettle on and waited for the water to boil",
    "he locked the door and put the key in his pocket",
    "the children ran outside to play in the snow",
]
LAMBADA_TEST = [
    "after the long walk the dog drank all of its water",
    "the pilot checked the instruments before the flight",
]


def test_lambada_tfds_few_shot_pool_is_the_development_text(tmp_path):
    """TFDS's own LAMBADA builder over the release's two text files: "train" is the
    development text (the paper's few-shot pool), "test" the evaluation set; a passage
    keeps its line's newline, which must not end up in the target word."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.lambada import lambada_dataset_builder

    dev = _write(tmp_path / "lambada_development_plain_text.txt", LAMBADA_DEV)
    test = _write(tmp_path / "lambada_test_plain_text.txt", LAMBADA_TEST)

    class LocalLambada(lambada_dataset_builder.Builder, skip_registration=True):
        name = "lambada"
        __module__ = lambada_dataset_builder.__name__  # its metadata files live there

        def _split_generators(self, dl_manager):
            return [
                tfds.core.SplitGenerator(name=tfds.Split.TRAIN, gen_kwargs={"filepath": str(dev)}),
                tfds.core.SplitGenerator(name=tfds.Split.TEST, gen_kwargs={"filepath": str(test)}),
            ]

    data_dir = tmp_path / "tfds"
    LocalLambada(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    task = tasks.resolve_task("lambada", tfds_data_dir=str(data_dir), tmp_dir=tmp_path)
    assert task.source == "tfds:lambada/test" and task.fewshot_source == "tfds:lambada/train"

    def key(e):
        return e.context, e.target

    want = sorted((t.rsplit(" ", 1)[0], t.rsplit(" ", 1)[1]) for t in LAMBADA_TEST)
    assert sorted(map(key, task.examples)) == want  # "water", not "water\n"
    assert sorted(e.demo() for e in task.fewshot_pool) == sorted(LAMBADA_DEV)
    # The release's files by path: the development text beside the test file is the pool.
    from_files = tasks.resolve_task(f"lambada={test}")
    assert sorted(map(key, from_files.examples)) == want
    assert from_files.fewshot_source == str(dev) and not from_files.fewshot_warning
    assert [e.demo() for e in from_files.fewshot_pool] == LAMBADA_DEV


def test_dev_set_few_shot_pools_and_the_fallback_warning(em, tmp_path, caplog):
    """StoryCloze and LAMBADA draw demonstrations from their dev/validation files beside
    the evaluated one (the paper's protocol); without one, the evaluated set itself is
    used and that is warned about, in the log and in the results."""
    header = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding"
    rows = [header] + [f"id{i},A{i}.,B.,C.,D.,Good end.,Bad end.,{1 + i % 2}" for i in range(4)]
    val = _write(tmp_path / "cloze_test_val__spring2016.csv", rows)
    test = _write(tmp_path / "cloze_test_test__spring2016.csv", rows[:3])
    task = tasks.resolve_task(f"storycloze={test}")
    assert task.fewshot_source == str(val) and len(task.fewshot_pool) == 4
    # Evaluating the validation file itself: no other split beside it.
    alone = tasks.resolve_task(f"storycloze={val}")
    assert alone.fewshot_pool is None
    assert "EVALUATION SET ITSELF" in alone.fewshot_warning
    assert "--fewshot-from storycloze=" in alone.fewshot_warning
    (tmp_path / "lambada").mkdir()
    lam = _write(
        tmp_path / "lambada" / "lambada_test.jsonl", [json.dumps({"text": LAMBADA_TEST[0]})]
    )
    assert "development/validation" in tasks.resolve_task(f"lambada={lam}").fewshot_warning
    with caplog.at_level(logging.WARNING):
        result, _ = harness.evaluate_task(em, alone, 1, harness.RunOptions())
    assert "EVALUATION SET ITSELF" in caplog.text and "K=1" in caplog.text
    assert result["fewshot_warning"] == alone.fewshot_warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # K=0 takes no demonstrations: nothing to say
        result, _ = harness.evaluate_task(em, alone, 0, harness.RunOptions())
    assert "EVALUATION SET ITSELF" not in caplog.text and result["fewshot_warning"] is None


# ----------------------------------------------------------------------------- few-shot


def _mc(i):
    return Example("mc", f"q{i}", ("yes", "no"), i % 2, doc_id=f"f:{i}")


def test_fewshot_is_seeded_never_self_and_joined():
    examples = [_mc(i) for i in range(20)]
    a = fewshot.build(examples, 3, pool=None, seed=7, fits=lambda e: True)
    b = fewshot.build(
        examples[:5], 3, pool=examples, pool_is_eval_set=True, seed=7, fits=lambda e: True
    )
    assert [s.example for s in a[:5]] == [s.example for s in b]  # independent of --limit
    c = fewshot.build(examples, 3, pool=None, seed=8, fits=lambda e: True)
    assert [s.demo_ids for s in a] != [s.demo_ids for s in c]
    for s, ex in zip(a, examples, strict=True):
        assert s.k == 3 and ex.doc_id not in s.demo_ids and len(set(s.demo_ids)) == 3
        parts = s.example.context.split("\n\n")
        assert len(parts) == 4 and parts[-1] == ex.context
        assert all(p in {e.demo() for e in examples} for p in parts[:3])
    # A separate training pool: an identical item is never drawn either.
    pool = [_mc(0), _mc(1)]
    shots = fewshot.build([_mc(0)], 1, pool=pool, seed=0, fits=lambda e: True)
    assert shots[0].demo_ids == ("f:1",)


def test_fewshot_k_clamped_to_fit_and_to_pool(caplog):
    examples = [_mc(i) for i in range(6)]
    shots = fewshot.build(
        examples, 4, pool=None, seed=0, fits=lambda e: e.context.count("\n\n") <= 2
    )
    assert [s.k for s in shots] == [2] * 6
    with caplog.at_level(logging.WARNING):
        shots = fewshot.build(examples, 50, pool=None, seed=0, fits=lambda e: True, name="t")
    assert [s.k for s in shots] == [5] * 6 and "larger than the few-shot pool" in caplog.text


def test_fewshot_uses_the_largest_k_that_fits_n_ctx(em, tok, tmp_path):
    """Examples of varied lengths at K=8 in a 64-token context: each gets the largest
    number of its drawn demonstrations whose prompt still fits, counted here directly
    from the tokens of every option's request."""
    words = "the quick brown fox jumps over a lazy dog while seven tired owls watch".split() * 3
    lengths = [1, 2, 1, 3, 1, 2, 24, 1, 2, 1, 36, 1, 2, 1, 12, 1]  # words per question
    rows = [
        {
            "query": f"Q{i}: " + " ".join(words[:n]) + "?\nA:",
            "choices": ["yes", "no"],
            "gold": i % 2,
        }
        for i, n in enumerate(lengths)
    ]
    task = tasks.resolve_task(f"mc={_write(tmp_path / 'mc.jsonl', map(json.dumps, rows))}")
    seed, k = 3, 8
    result, samples = harness.evaluate_task(em, task, k, harness.RunOptions(seed=seed))

    def prompt_tokens(prefix, ex):  # model input of the longest option: ctx + cont - 1
        pairs = [encode_pair(tok, prefix + ex.context, " " + c) for c in ex.choices]
        return max(len(c) + len(x) - 1 for c, x in pairs)

    expected = []
    for i, (ex, s) in enumerate(zip(task.examples, samples, strict=True)):
        drawn = fewshot.draw(i, ex, task.examples, k, seed, same_pool=True)
        assert len(drawn) == k and ex.doc_id not in [d.doc_id for d in drawn]
        prefixes = ["".join(d.demo() + "\n\n" for d in drawn[:n]) for n in range(k + 1)]
        fitting = [n for n in range(k + 1) if prompt_tokens(prefixes[n], ex) <= N_CTX]
        best = max(fitting, default=0)
        expected.append(best)
        assert s["k_used"] == best, (i, s["k_used"], fitting)
        assert s["demo_ids"] == [d.doc_id for d in drawn[:best]]
        assert s["context"] == prefixes[best] + ex.context
    assert len(set(expected)) >= 3 and 0 < max(expected) < k  # the limit really bites
    assert (result["k_used"], result["k_used_max"]) == (min(expected), max(expected))
    assert result["k_used_mean"] == pytest.approx(sum(expected) / len(expected))


# ----------------------------------------------------------------------------- metrics


def test_metrics():
    pred = metrics.mc_predictions(
        [-3.0, -4.0], n_chars=[1, 10], n_tokens=[1, 4], uncond_lls=[-1.0, -5.0]
    )
    assert pred == {"acc": 0, "acc_norm": 1, "acc_norm_token": 1, "acc_uncond": 1}
    value, se = metrics.mean_stderr([1, 0, 1, 1])
    assert value == 0.75 and abs(se - np.std([1, 0, 1, 1], ddof=1) / 2) < 1e-12
    ppl, _ = metrics.perplexity([-1.0, -3.0])
    assert abs(ppl - np.exp(2.0)) < 1e-9
    w = metrics.weighted_perplexities([-10.0, -20.0], words=[5, 5], n_bytes=[10, 20], tokens=[3, 3])
    assert abs(w["bits_per_byte"][0] - 1.0 / np.log(2)) < 1e-12
    assert abs(w["word_perplexity"][0] - np.exp(3.0)) < 1e-9
    assert metrics.exact_match("The Eiffel tower!", ["eiffel tower"]) == 1.0
    assert abs(metrics.f1("the big red dog", "big dog") - 0.8) < 1e-12  # P 2/3, R 1
    assert metrics.macro_f1([0, 1, 1], [0, 1, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)


# ----------------------------------------------------------------------------- harness + CLI


def test_cli_writes_results_table_png_and_samples(ckpt, shared_data, tmp_path, capsys):
    out = tmp_path / "results.json"
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    lm = _write(
        tmp_path / "lm.jsonl",
        [json.dumps({"text": text[:300]}), json.dumps({"text": text[300:500]})],
    )
    rc = cli_main([
        "--checkpoint", str(ckpt),
        "--task", f"hellaswag={shared_data / 'hellaswag' / 'hellaswag_val_first200.txt'}",
        "--task", f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}",
        "--task", f"lm={lm}",
        "--shots", "0,1", "--limit", "4", "--batch-size", "8", "--mesh", "data=1",
        "--output", str(out), "--log-samples", str(tmp_path / "samples.jsonl"),
    ])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Zero-Shot" in printed and "One-Shot" in printed and "hellaswag" in printed
    report = json.loads(out.read_text())
    results = {(r["task"], r["k"]): r for r in report["results"]}
    assert set(results) == {("hellaswag", 0), ("hellaswag", 1), ("piqa", 0), ("piqa", 1), ("lm", 0)}
    hs = results[("hellaswag", 0)]
    assert (
        hs["n"] == 4
        and hs["k_used"] == 0
        and set(hs["metrics"]) >= {"acc", "acc_norm", "acc_norm_token"}
    )
    assert {"value", "stderr"} == set(hs["metrics"]["acc"])
    assert results[("lm", 0)]["metrics"]["bits_per_byte"]["value"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 4 + 2 and json.loads(lines[0])["doc_id"].startswith(
        "hellaswag_val_first200.txt:"
    )


def test_failing_task_does_not_lose_finished_results(em, shared_data, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(harness, "_score_rolling", boom)
    ok = tasks.resolve_task(f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}")
    bad = tasks.resolve_task(f"wikitext={shared_data / 'wikitext-2' / 'valid.txt'}")
    out = tmp_path / "r.json"
    report = harness.run(em, [bad, ok], harness.RunOptions(limit=2, output=out))
    written = json.loads(out.read_text())["results"]
    assert written[0] == {"task": "wikitext", "k": 0, "error": "RuntimeError: device lost"}
    assert written[1]["task"] == "piqa" and "metrics" in written[1]
    assert "error" in report["table"]


def test_bad_input_messages(tmp_path, shared_data, ckpt, capsys):
    bad = _write(
        tmp_path / "piqa.jsonl", [json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}), "{not json"]
    )
    with pytest.raises(EvalInputError, match=r"piqa\.jsonl:2: malformed JSON"):
        loaders.load_piqa(bad)
    good = _write(tmp_path / "valid.jsonl", [json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})])
    with pytest.raises(
        EvalInputError,
        match=r"labels file for .*valid\.jsonl not found: expected .*valid-labels\.lst",
    ):
        loaders.load_piqa(good)
    with pytest.raises(
        EvalInputError, match="unknown task 'nosuch'; known tasks: .*hellaswag.*piqa"
    ):
        tasks.resolve_task("nosuch=x.jsonl")
    hs = _write(tmp_path / "hs.txt", ["ctx", "7", "a", "b", "c", "d"])
    with pytest.raises(EvalInputError, match=r"hs\.txt:2: gold label '7'"):
        loaders.load_hellaswag(hs)
    rte = _write(tmp_path / "rte.jsonl", [json.dumps({"premise": "p", "hypothesis": "h"})])
    with pytest.raises(EvalInputError, match=r"rte\.jsonl:1: no 'label'"):
        loaders.load_rte(rte)
    # The CLI: exit code 2 and the message, before any model work.
    assert cli_main(["--checkpoint", str(ckpt), "--task", "nosuch=x"]) == 2
    assert "known tasks" in capsys.readouterr().err
    assert cli_main(["--checkpoint", str(ckpt), "--task", f"piqa={bad}"]) == 2
    assert "piqa.jsonl:2" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "--checkpoint",
                str(tmp_path / "none"),
                "--task",
                f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}",
            ]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err
    piqa = f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}"
    assert cli_main(["--checkpoint", str(ckpt), "--task", piqa, "--shots", "0,a"]) == 2
    assert "--shots '0,a': expected comma-separated integers" in capsys.readouterr().err
    # A misspelled --fewshot-from name would silently be ignored: an error naming the tasks.
    argv = ["--checkpoint", str(ckpt), "--task", piqa, "--task", f"rte={shared_data / 'rte' / 'val.jsonl'}",
            "--shots", "1", "--fewshot-from", f"pika={shared_data / 'piqa' / 'valid_first200.jsonl'}"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "--fewshot-from pika=...: no --task is named 'pika'; the task names are: piqa, rte" in (
        capsys.readouterr().err
    )


def test_import_is_light():
    code = (
        "import sys, gptjax, gptjax.eval\n"
        "bad = [m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
