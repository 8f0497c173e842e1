"""GPT-1 fine-tuning: input layouts, loaders, the special-token rows, the heads and the
L3 objective, and a tiny end-to-end run from a real pretraining checkpoint (result JSON,
mid-epoch resume, predict, bad input)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import cli, model, train
from gptjax import config as config_lib
from gptjax import finetune as ft
from gptjax import finetune_data as fd
from gptjax.checkpoint import CheckpointError
from gptjax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptjax.eval import metrics
from gptjax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
SP = fd.Specials(start=100, delim=101, extract=102)


class CharTokenizer:
    """One id per character (a-z -> 1..26): exact, readable layouts."""

    vocab_size = 30

    def encode_batch(self, texts):
        return [[ord(c) - 96 for c in t if c.isalpha()] for t in texts]


# ----------------------------------------------------------------------------- layouts


def test_each_transformation_has_the_papers_token_layout():
    a, b, c = [1, 2, 3], [4, 5], [6]
    assert fd.layout("classification", [a], SP, 16) == ([[100, 1, 2, 3, 102]], False)
    assert fd.layout("entailment", [a, b], SP, 16) == ([[100, 1, 2, 3, 101, 4, 5, 102]], False)
    assert fd.layout("similarity", [a, b], SP, 16) == (
        [[100, 1, 2, 3, 101, 4, 5, 102], [100, 4, 5, 101, 1, 2, 3, 102]],
        False,
    )
    assert fd.layout("multiple_choice", [a, b, c], SP, 16) == (
        [[100, 1, 2, 3, 101, 4, 5, 102], [100, 1, 2, 3, 101, 6, 102]],
        False,
    )


def test_too_long_inputs_lose_tokens_from_their_longest_segment_and_are_counted():
    long, short = list(range(1, 11)), [20, 21]
    (seq,), cut = fd.layout("entailment", [long, short], SP, 10)
    assert cut and len(seq) == 10
    assert seq == [100, 1, 2, 3, 4, 5, 101, 20, 21, 102]  # the premise kept its start
    # A multiple-choice context keeps its end (the question), the answer is intact.
    (seq,), _ = fd.layout("multiple_choice", [long, short], SP, 10)
    assert seq == [100, 6, 7, 8, 9, 10, 101, 20, 21, 102]
    # Both segments long: they are cut to equal length.
    (seq,), _ = fd.layout("entailment", [long, long], SP, 9)
    assert seq == [100, 1, 2, 3, 101, 1, 2, 3, 102]

    spec = fd.TASKS["rte"]
    examples = [
        fd.TaskExample(("abcdefghij", "xy"), 0),
        fd.TaskExample(("ab", "cd"), 1),
    ]
    enc = fd.encode(spec, examples, CharTokenizer(), SP, 10)
    assert enc.truncated == 1
    source = fd.ExampleSource(enc, "train")
    rec = source[0]
    assert rec["tokens"].shape == (1, 10) and rec["extract"].tolist() == [9]
    assert source[1]["tokens"][0].tolist() == [100, 1, 2, 101, 3, 4, 102, 0, 0, 0]
    batch = fd.trim(fd.batch_at(source, [1, 1]), bucket=4)
    assert batch["tokens"].shape == (2, 1, 8)  # longest 7 -> a multiple of 4


def test_each_process_cuts_its_rows_to_the_global_batchs_length(monkeypatch):
    """With several processes every process's rows of a global batch are cut to one
    length, the one-process cut of the whole global batch (else their global array
    could not be assembled); with one process the cut is trim's."""
    rng = np.random.default_rng(0)
    seqs = [fd.layout("classification", [list(range(1, n))], SP, 40)[0]
            for n in rng.integers(2, 38, size=24)]  # fmt: skip
    source = fd.ExampleSource(fd.Encoded("sst2", seqs, np.zeros(24, np.float32), 40, 0,
                                         [""] * 24), "train")  # fmt: skip
    whole = fd.ExampleBatches(source, 8, seed=1, bucket=8)
    want = [next(whole) for _ in range(6)]  # two epochs
    plain = fd.ExampleBatches(source, 8, seed=1)
    assert [b["tokens"].shape for b in want] == [
        fd.trim(next(plain), 8)["tokens"].shape for _ in range(6)
    ]
    parts = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        it = fd.ExampleBatches(source, 8, seed=1, bucket=8)
        parts.append([next(it) for _ in range(6)])
    lengths = {tuple(b["tokens"].shape[-1] for b in part) for part in parts}
    assert len(lengths) == 1 and len(set(next(iter(lengths)))) > 1  # one cut, several sizes
    for k in range(6):
        for key in want[k]:
            np.testing.assert_array_equal(
                np.concatenate([part[k][key] for part in parts]), want[k][key]
            )
    # Somewhere a process's own rows alone would have been cut to another length.
    assert any(
        fd.trim(b, 8)["tokens"].shape[-1] != b["tokens"].shape[-1] for part in parts for b in part
    )


# ----------------------------------------------------------------------------- loaders


def test_shared_task_files_load(shared_data):
    sst2 = fd.TASKS["sst2"]
    glue = sst2.read(shared_data / "sst2" / "glue_sst2_dev.tsv")
    stsa = sst2.read(shared_data / "sst2" / "stsa.binary.dev")
    assert len(glue) == len(stsa) == 872
    assert glue[0].segments[0].startswith("it 's a charming") and glue[0].label == 1
    assert stsa[0].segments == ("one long string of cliches .",) and stsa[0].label == 0
    rte = fd.TASKS["rte"].read(shared_data / "rte" / "val.jsonl")
    assert len(rte) == 277 and {e.label for e in rte} == {0, 1}
    test = fd.TASKS["rte"].read(shared_data / "rte" / "test.jsonl", labelled=False)
    assert {e.label for e in test} == {fd.UNLABELLED}
    cb = fd.TASKS["cb"].read(shared_data / "cb" / "val.jsonl")
    assert {e.label for e in cb} == {0, 1, 2}
    snli = fd.TASKS["snli"].read(shared_data / "snli" / "snli_1.0_dev_head.jsonl")
    assert snli[0].segments[0] == "Two women are embracing while holding to go packages."
    assert snli[0].label == fd.TASKS["snli"].labels.index("neutral")


def test_glue_race_and_storycloze_formats(tmp_path):
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                    "gj04\t0\t*\tThe more we study verbs.\n")  # fmt: skip
    assert [e.label for e in fd.TASKS["cola"].read(cola)] == [1, 0]
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text('Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said "so.\tHe did.\n')
    (ex,) = fd.TASKS["mrpc"].read(mrpc)
    assert ex.segments == ('He said "so.', "He did.") and ex.label == 1
    stsb = tmp_path / "stsb.tsv"
    stsb.write_text("index\tgenre\tsentence1\tsentence2\tscore\n0\tx\tA man.\tA person.\t3.8\n")
    assert fd.TASKS["stsb"].read(stsb)[0].label == pytest.approx(3.8)
    race = tmp_path / "race"
    race.mkdir()
    (race / "1.txt").write_text(json.dumps({
        "article": "Tom has a cat.", "questions": ["What has Tom?", "Who?"],
        "options": [["a cat", "a dog", "a cow", "a pig"], ["Tom", "Ann", "Bob", "Cy"]],
        "answers": ["A", "A"],
    }))  # fmt: skip
    race_ex = fd.TASKS["race"].read(race)
    assert race_ex[0].segments == (
        "Tom has a cat. What has Tom?",
        "a cat",
        "a dog",
        "a cow",
        "a pig",
    )
    story = tmp_path / "story.csv"
    story.write_text(
        "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
        "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
        'x,A.,B.,C.,D.,"E, one.",F.,2\n'
    )
    (ex,) = fd.TASKS["storycloze"].read(story)
    assert ex.segments == ("A. B. C. D.", "E, one.", "F.") and ex.label == 1


def test_bad_task_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n'
                   '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n')  # fmt: skip
    with pytest.raises(fd.FinetuneDataError, match=r"bad.jsonl:2: unknown label 'maybe'"):
        fd.TASKS["rte"].read(bad)
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n  \t1\n")
    with pytest.raises(fd.FinetuneDataError, match=r"empty.tsv:2: empty field 'sentence'"):
        fd.TASKS["sst2"].read(empty)
    unlabelled = tmp_path / "test.jsonl"
    unlabelled.write_text('{"premise": "a", "hypothesis": "b", "idx": 0}\n')
    with pytest.raises(fd.FinetuneDataError, match="test.jsonl:1: no label"):
        fd.TASKS["rte"].read(unlabelled)
    assert fd.TASKS["rte"].read(unlabelled, labelled=False)[0].label == fd.UNLABELLED
    with pytest.raises(fd.FinetuneDataError, match="not found"):
        fd.TASKS["sst2"].read(tmp_path / "missing.tsv")


def test_metrics_against_known_values():
    p, g = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    m = fd.score(fd.TASKS["cola"], p, g)
    # tp=2 tn=1 fp=1 fn=1: MCC = (2-1)/sqrt(3*3*2*2) = 1/6
    assert m["matthews"] == pytest.approx(1 / 6) and m["accuracy"] == pytest.approx(0.6)
    assert fd.score(fd.TASKS["mrpc"], p, g)["f1"] == pytest.approx(2 / 3)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 2.0])
    s = fd.score(fd.TASKS["stsb"], x, y)
    assert s["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    # ranks of y with ties: [1, 4, 2.5, 2.5]
    assert s["spearman"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 4, 2.5, 2.5])[0, 1])
    # CB's macro F1 averages over the gold classes (0: 2/3, 1: 1); evaluation's default
    # also counts a class only predicted (2: 0), as scikit-learn's average="macro".
    p, g = np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1])
    assert fd.score(fd.TASKS["cb"], p, g)["macro_f1"] == pytest.approx(5 / 6)
    assert metrics.macro_f1(p, g) == pytest.approx(5 / 9)


# ----------------------------------------------------------------------------- model


def tiny_model(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=100, seq_len=16, n_layer=1, d_model=32, n_head=2, **kw)


@pytest.mark.parametrize("vocab,tie", [(100, True), (128, True), (128, False)])
def test_special_tokens_leave_every_pretrained_weight_unchanged(vocab, tie):
    base = dataclasses.replace(tiny_model(), vocab_size=vocab, tie_embeddings=tie)
    params = model.init_params(base, jax.random.key(0))
    new = ft.extend_vocab(params, base, jax.random.key(1))
    cfg = ft.with_specials(base, base)
    assert cfg.vocab_size == vocab + 3 and cfg.padded_vocab % base.vocab_multiple == 0
    assert new["wte"].shape == (cfg.padded_vocab, 32)
    assert cfg.padded_vocab == (128 if vocab == 100 else 256)  # in the padding / grown
    np.testing.assert_array_equal(new["wte"][:vocab], params["wte"][:vocab])
    rows = np.asarray(new["wte"][vocab : vocab + 3])
    assert np.all(rows != 0) and 0.005 < rows.std() < 0.05  # N(0, 0.02) like the others
    flat_old = jax.tree_util.tree_leaves_with_path(params)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, leaf in flat_old:
        if path[-1].key in ("wte", "lm_head"):
            continue
        np.testing.assert_array_equal(flat_new[path], leaf)  # bit for bit
    if not tie:
        np.testing.assert_array_equal(new["lm_head"][:, :vocab], params["lm_head"][:, :vocab])
        assert np.all(np.asarray(new["lm_head"][:, vocab : vocab + 3]) != 0)
    # The new ids are real tokens of the model: logits exist for them, not for padding.
    graphdef, _ = model.abstract_model(cfg)
    logits = model.apply(graphdef, new, jnp.array([[1, vocab, vocab + 2]]))
    assert np.all(np.isfinite(np.asarray(logits[..., : vocab + 3])))
    assert np.all(np.asarray(logits[..., vocab + 3 :]) < -1e30)


def _state(spec, seed=0, **model_kw):
    cfg = ft.with_specials(tiny_model(**model_kw), tiny_model(**model_kw))
    graphdef, _ = model.abstract_model(cfg)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"model": model.init_params(cfg, k1), "head": ft.init_head(k2, cfg, spec.n_outputs)}
    return cfg, graphdef, params


def test_similarity_head_is_order_symmetric():
    spec = fd.TASKS["mrpc"]
    cfg, graphdef, params = _state(spec)
    sp = fd.Specials.for_vocab(cfg.vocab_size)
    a, b = [5, 6, 7, 8], [9, 10]
    ab = fd.ExampleSource(fd.Encoded("mrpc", [fd.layout("similarity", [a, b], sp, 16)[0]],
                                     np.zeros(1, np.float32), 16, 0, [""]), "x")  # fmt: skip
    ba = fd.ExampleSource(fd.Encoded("mrpc", [fd.layout("similarity", [b, a], sp, 16)[0]],
                                     np.zeros(1, np.float32), 16, 0, [""]), "x")  # fmt: skip
    out = [ft.forward(graphdef, params, s[0]["tokens"][None], s[0]["extract"][None], spec)[0]
           for s in (ab, ba)]  # fmt: skip
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    # ... and not symmetric by accident: one ordering alone gives other scores.
    single = ft.forward(graphdef, params, ab[0]["tokens"][None, :1], ab[0]["extract"][None, :1],
                        spec)[0]  # fmt: skip
    assert not np.allclose(single, out[0])


def _independent_clf_loss(graphdef, params, batch, spec):
    """Cross-entropy of W_y h_extract, from the model's hidden states, in numpy."""
    gpt = nnx.merge(graphdef, params["model"])
    b, k, length = batch["tokens"].shape
    h = np.asarray(gpt.hidden(jnp.asarray(batch["tokens"].reshape(b * k, length))))
    h_ext = h[np.arange(b * k), batch["extract"].reshape(-1)].reshape(b, k, -1)
    w, bias = np.asarray(params["head"]["w_y"]), np.asarray(params["head"]["b_y"])
    scores = (
        (h_ext @ w + bias)[..., 0] if spec.kind == "multiple_choice" else (h_ext @ w + bias)[:, 0]
    )
    logp = scores - np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1, keepdims=True)) - scores.max(-1, keepdims=True)  # fmt: skip
    return -logp[np.arange(b), batch["label"].astype(int)].mean()


@pytest.mark.parametrize("task", ["rte", "storycloze"])
def test_lambda_zero_is_the_classifier_loss_and_lambda_adds_the_lm_loss(task):
    spec = fd.TASKS[task]
    cfg, graphdef, params = _state(spec)
    sp = fd.Specials.for_vocab(cfg.vocab_size)
    rng = np.random.default_rng(0)
    examples = [
        [list(rng.integers(1, 99, size=n)) for n in (5, 3, 4)[: 2 if task == "rte" else 3]]
        for _ in range(4)
    ]
    enc = fd.Encoded(task, [fd.layout(spec.kind, e, sp, 16)[0] for e in examples],
                     np.array([0, 1, 1, 0], np.float32), 16, 0, [""] * 4)  # fmt: skip
    batch = fd.batch_at(fd.ExampleSource(enc, "x"), range(4))
    l3, (l2, l1) = ft.finetune_loss(graphdef, params, batch, spec, lm_coef=0.0)
    expected = _independent_clf_loss(graphdef, params, batch, spec)
    assert float(l3) == pytest.approx(expected, rel=1e-5) and float(l1) == 0.0
    # lambda > 0 adds lambda * the LM loss; with every sequence filling its window the
    # masked L1 is pretraining's lm_loss on the same tokens.
    full = {
        **batch,
        "tokens": batch["tokens"][:, :1, :9],
        "extract": np.full((4, 1), 8, np.int32),
        "label": np.zeros(4, np.float32),
    }
    full["tokens"][:, 0, 8] = sp.extract
    l3, (l2, l1) = ft.finetune_loss(graphdef, params, full, spec, lm_coef=0.5)
    lm = train.lm_loss(graphdef, params["model"], jnp.asarray(full["tokens"][:, 0]))
    assert float(l1) == pytest.approx(float(lm), rel=1e-5)
    assert float(l3) == pytest.approx(float(l2) + 0.5 * float(lm), rel=1e-5)


def test_configs_load_and_overrides_are_checked():
    for path in sorted((REPO / "configs" / "finetune").glob("*.py")):
        text = path.read_text()  # test_configs' rule: configs name nothing outside the repo
        assert "../shared" not in text and "shared/data" not in text, path
        if path.stem == "pretrain_small":  # the experiment's pretraining run
            assert isinstance(config_lib.load(path), Config)
        else:
            cfg = ft.load_config(path)
            assert cfg.task.name == path.stem and cfg.optim.lr == 6.25e-5
    cfg = ft.load_config(REPO / "configs/finetune/sst2.py", ["finetune.lm_coef=0", "task.n_ctx=64"])
    assert cfg.finetune.lm_coef == 0.0 and cfg.task.n_ctx == 64
    assert (cfg.finetune.batch_size, cfg.finetune.epochs, cfg.finetune.warmup_fraction) == (
        32,
        3,
        0.002,
    )
    with pytest.raises(ConfigError, match="lm_coeff"):
        ft.load_config(REPO / "configs/finetune/sst2.py", ["finetune.lm_coeff=0"])
    with pytest.raises(ConfigError, match="warmup_fraction"):
        ft.load_config(REPO / "configs/finetune/sst2.py", ["optim.warmup_steps=10"])
    lr = ft.lr_schedule(ft.optimizer_config(cfg, 1000), 1000)
    assert float(lr(2)) == pytest.approx(6.25e-5) and float(lr(1000)) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pretrained(corpus, sp_model, token_cache, tmp_path_factory) -> Path:
    """A real (tiny, briefly trained) pretraining workdir."""
    workdir = tmp_path_factory.mktemp("pretrain")
    cfg = Config(
        model=ModelConfig(seq_len=32, n_layer=1, d_model=32, n_head=2),
        tokenizer=TokenizerConfig(kind="sentencepiece", path=str(sp_model)),
        data=DataConfig(sources=(str(corpus),), cache_dir=str(token_cache)),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(
            steps=4, batch_size=8, log_every=2, eval_every=4, eval_batches=1, sample_tokens=0
        ),  # fmt: skip
        checkpoint=CheckpointConfig(every_steps=4, async_save=False),
    )
    train.train(cfg, workdir)
    return workdir


def ft_config(shared_data, pretrained, **finetune) -> ft.FinetuneConfig:
    cfg = ft.load_config(REPO / "configs" / "finetune" / "sst2.py")
    return dataclasses.replace(
        cfg,
        task=dataclasses.replace(
            cfg.task, train=str(shared_data / "sst2" / "stsa.binary.train"),
            dev=str(shared_data / "sst2" / "glue_sst2_dev.tsv"), max_train=64, max_dev=32,
        ),
        finetune=dataclasses.replace(
            cfg.finetune, init_from=str(pretrained), batch_size=16, epochs=2, log_every=1,
            length_bucket=32, **finetune,
        ),
        optim=dataclasses.replace(cfg.optim, lr=1e-3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def straight(shared_data, pretrained, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ft_straight")
    return ft.finetune(ft_config(shared_data, pretrained), workdir), workdir


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_finetune_writes_results_and_keeps_the_best_epoch(straight):
    results, workdir = straight
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert 0.0 <= on_disk["dev_accuracy"] <= 1.0 and "majority_dev_accuracy" in on_disk
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    best = max(on_disk["epochs"], key=lambda e: e["dev_accuracy"])
    assert on_disk["dev_accuracy"] == best["dev_accuracy"]
    assert sorted(losses(workdir)) == list(range(1, 9))  # 64 / 16 = 4 steps x 2 epochs
    assert all(r["lm_loss"] > 0 for r in read_metrics(workdir) if "lm_loss" in r)
    assert (workdir / "best" / "metrics.json").exists()
    assert not list(workdir.glob(".*.tmp"))


def test_resume_mid_epoch_gives_identical_losses(straight, shared_data, pretrained, tmp_path):
    results, straight_dir = straight
    cfg = ft_config(shared_data, pretrained)
    with pytest.raises(train.Preempted):
        ft.finetune(cfg, tmp_path, stop_after=3)  # mid-way through epoch 1 (4 steps)
    assert not (tmp_path / "results.json").exists()
    resumed = ft.finetune(cfg, tmp_path)
    assert losses(tmp_path) == losses(straight_dir)
    assert resumed["epochs"] == results["epochs"]


def test_predict_writes_one_prediction_per_example(straight, shared_data, tmp_path):
    results, workdir = straight
    dev = tmp_path / "dev.tsv"
    lines = (shared_data / "sst2" / "glue_sst2_dev.tsv").read_text().splitlines()[:33]
    dev.write_text("\n".join(lines) + "\n")
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", "--checkpoint", str(workdir), "--task", f"sst2={dev}",
                     "--output", str(out), "--batch-size", "8"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 32 and rows[0]["prediction"] in ("0", "1")
    for r in rows:  # a softmax over the classes, whose largest is the prediction
        probs = np.asarray(r["probabilities"])
        assert probs.shape == (2,) and np.all(probs >= 0)
        assert probs.sum() == pytest.approx(1.0, abs=2e-6)
        assert r["prediction"] == fd.TASKS["sst2"].labels[int(probs.argmax())]
    assert len({tuple(r["probabilities"]) for r in rows}) > 1  # not one constant output
    accuracy = np.mean([r["prediction"] == r["label"] for r in rows])
    assert accuracy == pytest.approx(results["dev_accuracy"])  # the best epoch's model


def test_initial_state_is_the_pretrained_checkpoint_except_the_new_rows(shared_data, pretrained):
    """Through fine-tuning's own init path (checkpoint -> sharded initial state): every
    pretrained value is load_params' bit for bit; only the special-token rows are new."""
    from gptjax import sharding
    from gptjax.checkpoint import load_params
    from gptjax.optim import make_optimizer

    cfg = ft_config(shared_data, pretrained)
    spec = fd.TASKS["sst2"]
    _, base_cfg = ft._init_source(cfg)
    model_cfg = ft.with_specials(base_cfg, cfg.model)
    tx = make_optimizer(ft.optimizer_config(cfg, 8), 8)
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        _, _, state_sh = ft.state_shardings(model_cfg, spec, mesh, tx)
        state = ft._initial_state(cfg, model_cfg, base_cfg, spec, tx, state_sh, mesh)
    _, stored, _ = load_params(pretrained)
    got = dict(jax.tree_util.tree_leaves_with_path(state.params["model"]))
    want = dict(jax.tree_util.tree_leaves_with_path(stored))
    assert set(got) == set(want)
    v = base_cfg.vocab_size
    for path, old in want.items():
        new, old = np.asarray(got[path]), np.asarray(old)
        if path[-1].key not in ("wte", "lm_head"):
            np.testing.assert_array_equal(new, old)  # bit for bit
            continue
        rows_new, rows_old = (new, old) if path[-1].key == "wte" else (new.T, old.T)
        np.testing.assert_array_equal(rows_new[:v], rows_old[:v])
        np.testing.assert_array_equal(rows_new[v + 3 : len(rows_old)], rows_old[v + 3 :])
        assert np.all(rows_new[v : v + 3] != 0)  # drawn N(0, init_std)
        assert not np.any(rows_new[max(len(rows_old), v + 3) :])  # grown padding: zeros
        assert len(rows_new) == model_cfg.padded_vocab


def test_two_processes_finetune_like_one(straight, shared_data, pretrained, tmp_path):
    """`gptjax finetune` under launch/local.sh, 2 processes x 4 CPU devices, runs the
    steps of the in-process 8-device run (mesh data=8 both): the same losses up to the
    all-reduce's summation order (gloo here, XLA's in-process one there; see
    tests/test_multihost.py), the same dev metrics; only process 0 reports."""
    import os
    import subprocess
    import sys

    results, straight_dir = straight
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env |= {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
        "PYTHON": sys.executable,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "GPTJAX_TEST_COMPILE_CACHE", str(REPO / ".jax_cache")
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    sst2 = shared_data / "sst2"
    flags = {
        "task.train": sst2 / "stsa.binary.train", "task.dev": sst2 / "glue_sst2_dev.tsv",
        "task.max_train": 64, "task.max_dev": 32, "finetune.batch_size": 16,
        "finetune.epochs": 2, "finetune.log_every": 1, "finetune.length_bucket": 32,
        "optim.lr": 1e-3,
    }  # fmt: skip
    cmd = [
        REPO / "launch" / "local.sh", "2", "finetune",
        "--config", REPO / "configs" / "finetune" / "sst2.py",
        "--init-from", pretrained, "--workdir", tmp_path,
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip
    out = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=400
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[0] best epoch" in out.stdout and "[1] best epoch" not in out.stdout
    two, one = losses(tmp_path), losses(straight_dir)
    assert sorted(two) == sorted(one) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=1e-5)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [e["dev_accuracy"] for e in on_disk["epochs"]] == [
        e["dev_accuracy"] for e in results["epochs"]
    ]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_bad_input_fails_clearly_before_training(shared_data, pretrained, tmp_path, capsys):
    base = ["--config", str(REPO / "configs/finetune/sst2.py"), "--init-from", str(pretrained)]
    # An init checkpoint of another architecture than the config asks for.
    rc = cli.main(["finetune", *base, "--workdir", str(tmp_path / "a"), "--config.model.n_layer=3"])
    assert rc == 2 and "model.n_layer: checkpoint 1 vs config 3" in capsys.readouterr().err
    assert not (tmp_path / "a" / "results.json").exists()
    # A task file with an unknown label.
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\tpositive\n")
    rc = cli.main(["finetune", *base, "--workdir", str(tmp_path / "b"),
                   f"--config.task.train={bad}", f"--config.task.dev={bad}"])  # fmt: skip
    assert rc == 2 and "bad.tsv:3: unknown label 'positive'" in capsys.readouterr().err
    # n_ctx beyond the model's context; no init at all; a fine-tuned checkpoint as init.
    with pytest.raises(ConfigError, match="exceeds the model's seq_len"):
        ft.finetune(dataclasses.replace(ft_config(shared_data, pretrained),
                    task=dataclasses.replace(ft_config(shared_data, pretrained).task, n_ctx=64)),
                    tmp_path / "c")  # fmt: skip
    cfg = ft_config(shared_data, pretrained)
    no_init = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=""))
    with pytest.raises(ConfigError, match="--init-from"):
        ft.finetune(no_init, tmp_path / "d")
    rc = cli.main(["predict", "--checkpoint", str(pretrained), "--task", "sst2=x.tsv",
                   "--output", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert rc == 2 and "not a fine-tuned checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_reports_a_bad_tokenizer_record(monkeypatch, tmp_path, capsys):
    from gptjax.tokenizer import TokenizerError

    def damaged(*_args):
        raise TokenizerError("not a tokenizer record of format 1")

    monkeypatch.setattr(ft, "predict", damaged)
    rc = cli.main(["predict", "--checkpoint", str(tmp_path), "--task", "sst2=x.tsv",
                   "--output", str(tmp_path / "p.jsonl")])  # fmt: skip
    assert rc == 2 and "gptjax: not a tokenizer record" in capsys.readouterr().err


def test_random_init_ablation_uses_the_checkpoints_architecture(shared_data, pretrained, tmp_path):
    cfg = ft_config(shared_data, pretrained, init="random", lm_coef=0.0)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=1))
    results = ft.finetune(cfg, tmp_path)
    assert results["init"] == "random" and "dev_accuracy" in results
    assert all(r["lm_loss"] == 0.0 for r in read_metrics(tmp_path) if "lm_loss" in r)
    with pytest.raises(CheckpointError, match="not a pretraining"):
        ft.finetune(ft_config(shared_data, tmp_path), tmp_path / "again")


def test_a_non_finite_loss_is_never_checkpointed(shared_data, pretrained, tmp_path):
    """Checkpoints every step, logs every 100: the loss goes NaN between two log steps,
    yet no checkpoint holds a state after it (the losses are checked before each save)."""
    cfg = ft_config(shared_data, pretrained, warmup_fraction=0.0)
    cfg = dataclasses.replace(
        cfg,
        finetune=dataclasses.replace(cfg.finetune, log_every=100),
        optim=dataclasses.replace(cfg.optim, lr=1e12, clip_norm=0.0),
        checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=1, keep=100),
    )
    with pytest.raises(train.NonFiniteLoss):
        ft.finetune(cfg, tmp_path)
    from gptjax.checkpoint import Checkpointer, checkpoint_dir, load_params

    steps = Checkpointer(checkpoint_dir(tmp_path)).steps()
    assert steps, "no checkpoint before the loss went non-finite"
    for step in steps:
        _, params, _ = load_params(tmp_path / "checkpoints" / str(step))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
