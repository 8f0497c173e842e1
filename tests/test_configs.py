"""The shipped config files and the config system.

Every file under configs/ (helpers starting with "_" excepted) loads, validates and
round-trips; the GPT-1/2/3 configs match their papers (shapes, batch, LR, schedule in
tokens, parameter counts from the real model code under eval_shape, which allocates
nothing); command-line overrides are typed and bad ones fail with ConfigError naming
the key or file.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
from flax import nnx

from gptjax import config as config_lib
from gptjax import model
from gptjax.config import Config, ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
# configs/finetune/ holds fine-tuning configs (a FinetuneConfig tree), tested with their
# pretraining config in test_finetune.py.
CONFIGS = sorted(
    p
    for p in CONFIG_DIR.rglob("*.py")
    if not p.name.startswith("_") and p.parent != CONFIG_DIR / "finetune"
)
CONFIG_IDS = [str(p.relative_to(CONFIG_DIR)) for p in CONFIGS]
QUICKSTART = CONFIG_DIR / "quickstart.py"


def _load_common():
    spec = importlib.util.spec_from_file_location("test_configs_common", CONFIG_DIR / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _n_params(model_cfg) -> int:
    _, state = model.abstract_model(model_cfg)
    return model.param_count(nnx.to_pure_dict(state))


def _load(rel: str) -> Config:
    return config_lib.load(CONFIG_DIR / rel)


# ----------------------------------------------------------------------------- every config


def test_glob_finds_the_paper_configs():
    expected = {
        "quickstart.py",
        "gpt1.py",
        *(f"gpt2/{s}.py" for s in ("124m", "355m", "774m", "1_5b")),
        *(
            f"gpt3/{s}.py"
            for s in ("small", "medium", "large", "xl", "2_7b", "6_7b", "13b", "175b")
        ),
    }
    assert expected <= set(CONFIG_IDS)
    assert not any(Path(i).name.startswith("_") for i in CONFIG_IDS)


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_loads_and_validates(path):
    cfg = config_lib.load(path)
    assert isinstance(cfg, Config)
    assert cfg == config_lib.validate(cfg)
    # Loading twice gives the same config (no state leaks between loads).
    assert config_lib.load(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_round_trips(path):
    cfg = config_lib.load(path)
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg
    # Through JSON (checkpoints store it so): tuples come back as lists and are restored.
    assert config_lib.from_dict(json.loads(config_lib.dumps(cfg))) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_config_refers_to_nothing_outside_the_repo(path):
    text = path.read_text()
    assert "../shared" not in text and "shared/data" not in text
    cfg = config_lib.load(path)
    assert not cfg.tokenizer.path.startswith("..")


# ----------------------------------------------------------------------------- GPT-3

# Table 2.1 (Brown et al. 2020), with XL's heads (printed 24) as 16 and 13B's d_model
# (printed 5140) as 5120: see configs/gpt3/xl.py and 13b.py.
# file, paper params, layers, d_model, heads, d_head, batch (sequences of 2048), LR,
# batch-ramp tokens chosen
GPT3 = [
    ("small", 125e6, 12, 768, 12, 64, 256, 6.0e-4, 4e9),
    ("medium", 350e6, 24, 1024, 16, 64, 256, 3.0e-4, 4e9),
    ("large", 760e6, 24, 1536, 16, 96, 256, 2.5e-4, 4e9),
    ("xl", 1.3e9, 24, 2048, 16, 128, 512, 2.0e-4, 8e9),
    ("2_7b", 2.7e9, 32, 2560, 32, 80, 512, 1.6e-4, 8e9),
    ("6_7b", 6.7e9, 32, 4096, 32, 128, 1024, 1.2e-4, 12e9),
    ("13b", 13.0e9, 40, 5120, 40, 128, 1024, 1.0e-4, 12e9),
    ("175b", 175.0e9, 96, 12288, 96, 128, 1536, 0.6e-4, 12e9),
]
# The table's batch sizes in tokens, as printed (rounded: 1536 x 2048 = 3.15M is "3.2M").
GPT3_BATCH_TOKENS = {256: 0.5e6, 512: 1e6, 1024: 2e6, 1536: 3.2e6}


@pytest.mark.parametrize("row", GPT3, ids=[r[0] for r in GPT3])
def test_gpt3_matches_table(row):
    name, paper_params, n_layer, d_model, n_head, d_head, batch, lr, _ = row
    cfg = _load(f"gpt3/{name}.py")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.d_model, m.n_head, m.head_dim) == (n_layer, d_model, n_head, d_head)
    assert m.n_head * m.head_dim == m.d_model
    assert m.seq_len == 2048 and m.ffn_dim == 4 * d_model
    assert m.vocab_size == 50257 and m.padded_vocab == 50304
    assert m.prenorm and m.tie_embeddings and m.use_bias and m.position == "learned"
    assert m.attention_windows == (0, 256)  # alternating dense / banded
    assert m.dropout == 0.0 and m.attn_dropout == 0.0
    assert (m.param_dtype, m.compute_dtype) == ("float32", "bfloat16")
    assert t.batch_size == batch
    printed = GPT3_BATCH_TOKENS[batch]
    assert abs(t.batch_size * m.seq_len - printed) / printed < 0.05
    assert o.lr == lr
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert o.schedule == "cosine" and o.min_lr_ratio == 0.1
    assert cfg.tokenizer.kind == "gpt2"
    # remat for the sizes whose activations do not fit (see configs/_common.py).
    assert m.remat == ("full" if paper_params > 2e9 else "none")

    n = _n_params(m)
    assert abs(n - paper_params) / paper_params < 0.03, f"{name}: {n:,} parameters"


def _token_counter(cfg: Config):
    """tokens(n): tokens consumed by the first n optimizer steps, as the trainer runs
    the batch ramp (gptjax.train.microbatches_at)."""
    from gptjax.train import microbatches_at

    t, seq = cfg.train, cfg.model.seq_len
    micro_tokens = t.batch_size // t.microbatches * seq
    prefix = [0]
    for s in range(t.batch_ramp_steps):
        prefix.append(prefix[-1] + microbatches_at(cfg, s) * micro_tokens)
    # After the ramp every step is a full batch.
    for s in (t.batch_ramp_steps, t.batch_ramp_steps + 1, t.steps - 1):
        assert microbatches_at(cfg, s) == t.microbatches

    def tokens(n: int) -> int:
        if n <= t.batch_ramp_steps:
            return prefix[n]
        return prefix[-1] + (n - t.batch_ramp_steps) * t.batch_size * seq

    return tokens


def _assert_nearest(tokens, steps: int, budget: float):
    """`steps` is the step count whose cumulative tokens are nearest `budget`."""
    err = abs(tokens(steps) - budget)
    assert err <= abs(tokens(steps - 1) - budget)
    assert err <= abs(tokens(steps + 1) - budget)


@pytest.mark.parametrize("row", GPT3, ids=[r[0] for r in GPT3])
def test_gpt3_schedule_in_tokens(row):
    name, *_, batch, _, ramp_tokens = row
    cfg = _load(f"gpt3/{name}.py")
    t, o, seq = cfg.train, cfg.optim, cfg.model.seq_len

    # Batch ramp: from 32k tokens (16 sequences, one microbatch of 16) to the full
    # batch, over about the chosen number of tokens (4-12B in the paper).
    assert t.batch_ramp_start * seq == 32 * 1024
    assert t.batch_size // t.microbatches == 16
    tokens = _token_counter(cfg)
    assert 4e9 * 0.98 <= tokens(t.batch_ramp_steps) <= 12e9 * 1.02
    assert abs(tokens(t.batch_ramp_steps) - ramp_tokens) / ramp_tokens < 0.02

    # 375M-token warmup, cosine to 10% over 260B tokens, 300B tokens in all.
    _assert_nearest(tokens, o.warmup_steps, 375e6)
    _assert_nearest(tokens, o.decay_steps, 260e9)
    _assert_nearest(tokens, t.steps, 300e9)
    # The ramp holds fewer tokens per step, so each budget takes more steps than the
    # full-batch division; past the ramp, by the same number of steps (up to rounding).
    full = batch * seq
    assert o.warmup_steps > round(375e6 / full)
    extra = t.steps - round(300e9 / full)
    assert extra > 0 and abs(extra - (o.decay_steps - round(260e9 / full))) <= 1


def test_steps_for_tokens_without_ramp_is_the_division():
    common = _load_common()
    # GPT-3 Small's batch without the ramp: 375e6 / (256 * 2048) = 715.3.
    assert common.steps_for_tokens(375e6, batch_size=256, seq_len=2048) == 715
    assert common.steps_for_tokens(260e9, batch_size=256, seq_len=2048) == round(260e9 / 2**19)
    assert common.steps_for_tokens(300e9, batch_size=256, seq_len=2048) == round(300e9 / 2**19)


def test_gpt3_table_inconsistencies_as_documented():
    # XL: 24 heads x 128 (d_attn 3072) would give 1.52B, not the printed 1.3B.
    xl = _load("gpt3/xl.py").model
    wide = dataclasses.replace(xl, n_head=24, d_head=128)
    assert _n_params(wide) > 1.45e9 > 1.35e9 > _n_params(xl)
    # 13B: 5140 is not divisible by 40 heads; validation refuses it without a d_head.
    with pytest.raises(ConfigError, match="d_model=5140"):
        config_lib.load(CONFIG_DIR / "gpt3/13b.py", ["model.d_model=5140"])
    b13 = _load("gpt3/13b.py").model
    as_printed = dataclasses.replace(b13, d_model=5140, d_head=128)
    assert abs(_n_params(as_printed) - _n_params(b13)) / _n_params(b13) < 0.01


# ----------------------------------------------------------------------------- GPT-2

# Hugging Face's gpt2, gpt2-medium, gpt2-large, gpt2-xl (tied, with biases, 50,257 ids).
GPT2 = [
    ("124m", 12, 768, 12, 124_439_808, 6.0e-4),
    ("355m", 24, 1024, 16, 354_823_168, 3.0e-4),
    ("774m", 36, 1280, 20, 774_030_080, 2.5e-4),
    ("1_5b", 48, 1600, 25, 1_557_611_200, 2.0e-4),
]


@pytest.mark.parametrize("row", GPT2, ids=[r[0] for r in GPT2])
def test_gpt2(row):
    name, n_layer, d_model, n_head, hf_params, lr = row
    cfg = _load(f"gpt2/{name}.py")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.d_model, m.n_head) == (n_layer, d_model, n_head)
    assert m.seq_len == 1024 and m.vocab_size == 50257 and m.ffn_dim == 4 * d_model
    assert m.prenorm and m.tie_embeddings and m.use_bias
    assert m.attention_windows == (0,)
    assert m.dropout == 0.1 and m.attn_dropout == 0.1
    assert t.batch_size == 512 and t.batch_ramp_start == 0
    assert o.lr == lr
    # Exact parameter count with the vocabulary unpadded.
    assert _n_params(dataclasses.replace(m, vocab_multiple=1)) == hf_params
    # GPT-3's token schedule at 512 x 1024 = 2^19 tokens per step, no ramp.
    assert o.warmup_steps == 715
    assert o.decay_steps == round(260e9 / 2**19)
    assert t.steps == round(300e9 / 2**19)


# ----------------------------------------------------------------------------- GPT-1


def test_gpt1():
    cfg = _load("gpt1.py")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.d_model, m.n_head, m.ffn_dim, m.seq_len) == (12, 768, 12, 3072, 512)
    assert not m.prenorm and m.position == "learned" and m.mlp == "gelu"
    assert m.tie_embeddings and m.dropout == 0.1 and m.attn_dropout == 0.1
    assert (o.lr, o.warmup_steps, o.schedule, o.min_lr_ratio) == (2.5e-4, 2000, "cosine", 0.0)
    assert (o.b1, o.b2, o.eps, o.weight_decay) == (0.9, 0.999, 1e-8, 0.01)
    assert o.decay_embeddings  # "all non bias or gain weights"
    assert (t.batch_size, t.microbatches, t.batch_ramp_start) == (64, 1, 0)
    # With the paper's 40,478-token vocabulary: the "117M".
    paper = _n_params(dataclasses.replace(m, vocab_size=40478, vocab_multiple=1))
    assert paper == 116_534_784
    # With GPT-2's BPE (padded to 50,304 rows): only the embedding grows.
    assert _n_params(m) == paper + (50304 - 40478) * 768


# ----------------------------------------------------------------------------- overrides


def test_overrides_set_typed_values():
    cfg = config_lib.load(
        QUICKSTART,
        [
            "train.steps=7",
            "mesh.fsdp=2",
            "data.sources=a.txt,b.txt",
            "model.attention_windows=0,128",
            "optim.lr=1e-3",
            "model.prenorm=false",
            "model.norm=rmsnorm",
        ],
    )
    assert cfg.train.steps == 7 and type(cfg.train.steps) is int
    assert cfg.mesh.fsdp == 2
    assert cfg.data.sources == ("a.txt", "b.txt")
    assert cfg.model.attention_windows == (0, 128)
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.model.prenorm is False and cfg.model.norm == "rmsnorm"
    # Everything not overridden is the file's.
    base = config_lib.load(QUICKSTART)
    assert cfg.model.d_model == base.model.d_model and cfg.train.seed == base.train.seed


@pytest.mark.parametrize("rel", ["gpt1.py", "gpt2/124m.py", "gpt3/175b.py"])
def test_shape_override_rescales_derived_dims(rel):
    # d_ff and d_head follow d_model (4 d_model, d_model / n_head), so a paper config
    # shrinks consistently for a smoke test.
    cfg = config_lib.load(CONFIG_DIR / rel, ["model.d_model=64", "model.n_head=2"])
    assert (cfg.model.ffn_dim, cfg.model.head_dim) == (256, 32)


def test_later_override_wins():
    cfg = config_lib.load(QUICKSTART, ["train.steps=7", "train.steps=9"])
    assert cfg.train.steps == 9


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.stepz=1", "train.stepz"),
        ("trian.steps=1", "trian.steps"),
        ("train=1", "train"),
        ("train.steps=abc", "train.steps"),
        ("train.seed=1.5", "train.seed"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.prenorm=maybe", "model.prenorm"),
        ("model.attention_windows=0,x", "model.attention_windows"),
        ("train.steps7", "train.steps7"),
        # Well-typed but invalid: validation runs after the overrides.
        ("train.microbatches=3", "microbatches"),
        ("train.eval_batches=0", "eval_batches"),
        ("model.attention_windows=0,128,256", "attention_windows"),
    ],
)
def test_bad_override_raises_config_error(override, named):
    with pytest.raises(ConfigError) as e:
        config_lib.load(QUICKSTART, [override])
    assert named in str(e.value)


def test_missing_config_file(tmp_path):
    path = tmp_path / "no_such_config.py"
    with pytest.raises(ConfigError, match="no_such_config.py"):
        config_lib.load(path)


@pytest.mark.parametrize(
    "source",
    [
        "x = 1\n",  # no get_config
        "get_config = 3\n",  # not a function
        "def get_config():\n    return {'train': {'steps': 1}}\n",  # not a Config
        "import no_such_module_anywhere\n",  # fails while loading
        "def get_config(:\n",  # syntax error
    ],
    ids=["no-get_config", "not-a-function", "returns-dict", "import-error", "syntax-error"],
)
def test_broken_config_file(tmp_path, source):
    path = tmp_path / "broken_cfg.py"
    path.write_text(source)
    with pytest.raises(ConfigError) as e:
        config_lib.load(path)
    assert "broken_cfg.py" in str(e.value)


def test_config_file_with_ill_typed_field(tmp_path):
    path = tmp_path / "ill_typed.py"
    path.write_text(
        "from gptjax.config import Config, TrainConfig\n"
        "def get_config():\n"
        "    return Config(train=TrainConfig(steps='100'))\n"
    )
    with pytest.raises(ConfigError, match="train.steps"):
        config_lib.load(path)


def test_from_dict_rejects_unknown_keys():
    d = config_lib.to_dict(config_lib.load(QUICKSTART))
    d["train"]["stepz"] = 1
    with pytest.raises(ConfigError, match="stepz"):
        config_lib.from_dict(d)


@pytest.mark.parametrize(
    "flag", [["--config.train.stepz=1"], ["--config.train.stepz", "1"]], ids=["eq", "space"]
)
def test_cli_reports_bad_override_before_training(tmp_path, capsys, flag):
    from gptjax import cli

    workdir = tmp_path / "run"
    argv = ["train", "--config", str(QUICKSTART), "--workdir", str(workdir), *flag]
    assert cli.main(argv) == 2
    assert "train.stepz" in capsys.readouterr().err
    # Refused before anything ran: no workdir, so no tokenizer, cache or checkpoints.
    assert not workdir.exists()


def test_cli_reports_missing_config_file(tmp_path, capsys):
    from gptjax import cli

    workdir = tmp_path / "run"
    missing = tmp_path / "missing_cfg.py"
    assert cli.main(["train", "--config", str(missing), "--workdir", str(workdir)]) == 2
    assert "missing_cfg.py" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.batch_ramp_start=16", "train.batch_ramp_steps=0"],
        ["train.batch_ramp_start=64", "train.batch_ramp_steps=10"],
        ["train.microbatches=4", "train.batch_ramp_start=3", "train.batch_ramp_steps=10"],
    ],
)
def test_inconsistent_batch_ramp_is_rejected(overrides):
    with pytest.raises(ConfigError, match="ramp"):
        config_lib.load(REPO / "configs" / "quickstart.py", overrides)


def test_gpt2_tokenizer_without_path_fails_before_touching_the_workdir(tmp_path, capsys):
    from gptjax import cli

    workdir = tmp_path / "run"
    rc = cli.main(
        ["train", "--config", str(REPO / "configs/gpt3/small.py"), "--workdir", str(workdir)]
    )
    assert rc == 2
    assert "tokenizer.path" in capsys.readouterr().err
    assert not workdir.exists()


def test_cli_reports_a_mesh_that_does_not_fit_the_devices_before_any_work(tmp_path, capsys):
    from gptjax import cli

    workdir = tmp_path / "run"
    argv = ["train", "--config", str(QUICKSTART), "--workdir", str(workdir)]
    assert cli.main([*argv, "--config.mesh.data=3"]) == 2  # 8 simulated devices
    assert "mesh" in capsys.readouterr().err
    assert not workdir.exists()  # no tokenizer trained, no cache built
