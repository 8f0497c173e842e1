"""Test setup: 8 simulated CPU devices, a persistent compile cache, shared data."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from gptjax.tokenizer import train_sentencepiece  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GPTJAX_TEST_COMPILE_CACHE", REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data not found at {SHARED_DATA} (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def corpus(shared_data) -> Path:
    return shared_data / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="session")
def sp_model(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "shakespeare512.model"
    return train_sentencepiece([corpus], 512, out)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


@pytest.fixture(scope="session")
def gpt2_checkpoint(shared_data, tmp_path_factory):
    """make(seq_len, n_layer) -> a random-init checkpoint (d_model 32, 4 heads, key 0)
    with GPT-2's BPE tokenizer, the model the evaluation tests score; one per shape."""
    from gptjax import checkpoint, config, model
    from gptjax.config import Config, ModelConfig, TokenizerConfig
    from gptjax.tokenizer import load_tokenizer

    made: dict[tuple[int, int], Path] = {}

    def make(seq_len: int, n_layer: int) -> Path:
        if (seq_len, n_layer) not in made:
            tok = load_tokenizer(TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe")))
            m = ModelConfig(
                vocab_size=tok.vocab_size, seq_len=seq_len, n_layer=n_layer, d_model=32, n_head=4
            )
            cfg = Config(model=m, tokenizer=TokenizerConfig(kind="gpt2"))
            out = tmp_path_factory.mktemp("gpt2_ckpt") / "ckpt"
            params = model.init_params(cfg.model, jax.random.key(0))
            checkpoint.save_params(out, config.to_dict(cfg), params, tok.to_record())
            made[seq_len, n_layer] = out
        return made[seq_len, n_layer]

    return make
