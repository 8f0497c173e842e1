"""Generation with a KV cache: one jitted prefill + decode loop, batched and sampled.

Prompts of different lengths are left-padded to a common length P, so every row writes
slot P + i at decode step i; padding slots are masked out of attention and each row's
positions start at 0 on its first real token. The loop (lax.while_loop) runs on the
device until every row has stopped or max_new_tokens are out. Under a mesh the same loop
runs on parameters sharded as in training (`load` reads them straight onto it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import model as model_lib
from gptjax.config import ModelConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling controls, checked on construction (a ValueError names the bad one)."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    max_new_tokens: int = 64
    stop_ids: tuple[int, ...] = ()
    num_beams: int = 1  # > 1: deterministic beam search (gptjax.beam); sampling is off
    length_penalty: float = 1.0  # beam score: sum log p / generated tokens ** this

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1 (1: no beam search), got {self.num_beams}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be finite, got {self.length_penalty}")
        if self.num_beams > 1 and (self.top_k or self.top_p < 1.0):
            raise ValueError("beam search is deterministic: top_k/top_p do not apply to it")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: Sampling) -> None:
    """ValueError unless 1 <= max_new_tokens < the context, top_k fits the vocabulary
    and every prompt id is a token id of the model, in [0, vocab_size)."""
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if sampling.max_new_tokens >= cfg.seq_len:
        raise ValueError(
            f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in "
            f"the model's {cfg.seq_len}-token context"
        )
    if sampling.top_k > cfg.vocab_size:
        raise ValueError(
            f"top_k={sampling.top_k} is larger than the model's vocabulary of {cfg.vocab_size}"
        )
    for row, p in enumerate(prompts):
        bad = [int(t) for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {row}: token ids {bad[:5]} are outside the model's vocabulary "
                f"[0, {cfg.vocab_size})"
            )


def sample_logits(logits_BxV, key, s: Sampling):
    """Next tokens [B] from logits under temperature, top-k and nucleus (top-p) sampling."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if s.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1)
    logits_BxV = logits_BxV / s.temperature
    if s.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, s.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if s.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
        # The smallest set whose mass reaches top_p: keep tokens whose preceding mass < p.
        n_keep_Bx1 = jnp.sum(cum_BxV - jax.nn.softmax(sorted_BxV, axis=-1) < s.top_p, -1)[:, None]
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P] left-padded, number of padding slots per row [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p) :] = p
    return tokens, np.array([width - len(p) for p in prompts], np.int32)


def make_generate_fn(graphdef, cfg: ModelConfig, sampling: Sampling):
    """jit-able (params, head_DxV, tokens_BxP, pad_B, key) -> (new tokens [B, max_new],
    lengths [B]). head_DxV: model.decode_head(params, cfg), made outside this jit."""
    n_new = sampling.max_new_tokens
    stop = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

    def generate(params, head_DxV, tokens_BxP, pad_B, key):
        model = nnx.merge(graphdef, params)
        b, p = tokens_BxP.shape
        layer_params = model.layer_params()  # sliced once, outside the loop
        logits_BxPxV, cache = model.prefill(tokens_BxP, pad_B, p + n_new, head_DxV, layer_params)

        def cond(carry):
            i, _, _, _, done_B, _ = carry
            return (i < n_new) & ~jnp.all(done_B)

        def body(carry):
            i, logits_BxV, cache, out_BxN, done_B, key = carry
            key, sub = jax.random.split(key)
            token_B = sample_logits(logits_BxV[:, : cfg.vocab_size], sub, sampling)
            token_B = jnp.where(done_B, 0, token_B).astype(jnp.int32)
            out_BxN = out_BxN.at[:, i].set(token_B)
            done_B = done_B | jnp.isin(token_B, stop)
            positions_Bx1 = (p + i - pad_B)[:, None]
            logits_Bx1xV, cache = model.decode(
                token_B[:, None], positions_Bx1, cache, head_DxV, layer_params
            )
            return i + 1, logits_Bx1xV[:, 0], cache, out_BxN, done_B, key

        init = (
            jnp.zeros((), jnp.int32),
            logits_BxPxV[:, -1],
            cache,
            jnp.zeros((b, n_new), jnp.int32),
            jnp.zeros((b,), bool),
            key,
        )
        _, _, _, out_BxN, _, _ = jax.lax.while_loop(cond, body, init)
        # Length of each row: up to and including its first stop token.
        is_stop_BxN = jnp.isin(out_BxN, stop)
        first_stop_B = jnp.where(is_stop_BxN.any(-1), jnp.argmax(is_stop_BxN, -1) + 1, n_new)
        return out_BxN, first_stop_B

    return generate


@functools.lru_cache(maxsize=16)
def jitted_generate_fn(graphdef, cfg: ModelConfig, sampling: Sampling):
    """(params, tokens_BxP, pad_B, key) -> make_generate_fn's outputs, compiled once per
    (model, sampling): a new jax.jit per call would trace and compile the loop every time.
    num_beams > 1 runs gptjax.beam's beam search instead of sampling.
    The decode head (model.decode_head) is made by a jit of its own first."""
    if sampling.num_beams > 1:
        from gptjax.beam import make_beam_fn

        loop = jax.jit(make_beam_fn(graphdef, cfg, sampling))
    else:
        loop = jax.jit(make_generate_fn(graphdef, cfg, sampling))
    head = jax.jit(functools.partial(model_lib.decode_head, cfg=cfg))
    return lambda params, *args: loop(params, head(params), *args)


def fit_prompts(cfg: ModelConfig, prompts, sampling: Sampling) -> list[list[int]]:
    """The prompts as generate_ids decodes them: cut from the left to their last
    seq_len - max_new_tokens ids, leaving room for the new tokens."""
    room = cfg.seq_len - sampling.max_new_tokens
    return [list(p)[-room:] for p in prompts]


def generate_ids(
    graphdef,
    params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    seed: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt (stop ids excluded). Prompts longer than the
    context allows are cut from the left, with a warning. Under `jax.set_mesh` the
    parameters may be sharded (fsdp/tensor): the same loop runs on the mesh."""
    check_request(cfg, prompts, sampling)
    fitted = fit_prompts(cfg, prompts, sampling)
    if any(len(f) < len(p) for f, p in zip(fitted, prompts, strict=True)):
        room = cfg.seq_len - sampling.max_new_tokens
        log.warning("prompt cut to its last %d tokens to fit the context", room)
    tokens, pad = left_pad(fitted)
    fn = jitted_generate_fn(graphdef, cfg, sampling)
    out, lengths = jax.device_get(fn(params, tokens, pad, jax.random.key(seed)))
    result = []
    for row, n in zip(out, lengths, strict=True):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in sampling.stop_ids:
            ids = ids[:-1]
        result.append(ids)
    return result


def cut_at_stop(text: str, stop_sequences: Sequence[str]) -> str:
    """Text up to (not including) the first of the stop sequences."""
    cut = min((i for i in (text.find(s) for s in stop_sequences if s) if i >= 0), default=None)
    return text if cut is None else text[:cut]


def sample_text(
    graphdef,
    params,
    tokenizer,
    cfg: ModelConfig,
    prompt: str,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int = 40,
) -> str:
    """A short sample for the end of training: prompt (or EOS) -> continuation text."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    sampling = Sampling(
        temperature=temperature,
        top_k=min(top_k, cfg.vocab_size),
        max_new_tokens=min(max_new_tokens, cfg.seq_len - 1),
        stop_ids=(tokenizer.eos_id,),
    )
    [new] = generate_ids(graphdef, params, cfg, [ids], sampling, seed)
    return tokenizer.decode(new)


def continuation_text(tokenizer, prompt: Sequence[int], new: Sequence[int]) -> str:
    """Text of the new ids as they read after the prompt: decode(prompt + new) less the
    prompt's text, so a SentencePiece word boundary at the seam keeps its space (decoding
    the new ids alone would drop it); decode(new) where the prompt's text is no prefix."""
    whole, head = tokenizer.decode(list(prompt) + list(new)), tokenizer.decode(list(prompt))
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(list(new))


def cut_ids_at_stop(
    decode: Callable[[list[int]], str], ids: Sequence[int], stop_sequences: Sequence[str]
) -> list[int]:
    """The ids whose text lies wholly before the first stop sequence in decode(ids) (all
    of them when none occurs): the longest prefix whose decoded text is a prefix of
    cut_at_stop's text. The token in which the stop sequence begins is dropped with
    everything after it, so the kept ids decode to cut_at_stop's text whenever the stop
    sequence begins on a token boundary (to a shorter prefix of it otherwise)."""
    ids = [int(t) for t in ids]
    text = decode(ids)
    kept = cut_at_stop(text, stop_sequences)
    if len(kept) == len(text):
        return ids
    n = 0
    while n < len(ids) and kept.startswith(decode(ids[: n + 1])):
        n += 1
    return ids[:n]


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to generate from: its model, parameters (on `mesh`, when one
    is given, with the shardings training derives) and tokenizer (None when it has none)."""

    cfg: ModelConfig
    graphdef: object
    params: object
    tokenizer: object
    mesh: object = None

    def generate(self, prompts, sampling: Sampling, seed: int = 0) -> list[list[int]]:
        if self.mesh is None:
            return generate_ids(self.graphdef, self.params, self.cfg, prompts, sampling, seed)
        with jax.set_mesh(self.mesh):
            return generate_ids(self.graphdef, self.params, self.cfg, prompts, sampling, seed)


def read_checkpoint_info(checkpoint) -> tuple[ModelConfig, object]:
    """(model config, tokenizer or None) of a checkpoint, without reading its weights."""
    from gptjax import config as config_lib
    from gptjax.checkpoint import read_checkpoint_json
    from gptjax.tokenizer import tokenizer_from_record

    stored, record = read_checkpoint_json(checkpoint)
    return config_lib.from_dict(stored).model, tokenizer_from_record(record) if record else None


def load(checkpoint, mesh=None, info=None, dtype: str | None = None) -> Loaded:
    """Load a checkpoint (converted, or a training workdir's latest step) for generation.
    With a mesh the parameters are read straight onto the shardings gptjax.sharding
    derives for training (as gptjax.eval does), never as an unsharded copy first.

    dtype ("bfloat16", "float32"; default: as stored) is the dtype the parameters are
    read in and the model computes in: Orbax casts each shard as it reads it, so a
    bfloat16 evaluation of a float32 checkpoint never holds the float32 weights."""
    from gptjax import sharding
    from gptjax.checkpoint import abstract_with_shardings, load_params

    cfg, tokenizer = info or read_checkpoint_info(checkpoint)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=dtype, compute_dtype=dtype)
    graphdef, abstract = model_lib.abstract_model(cfg)
    abstract_params = None
    if mesh is not None:
        shardings = sharding.param_shardings(abstract, mesh)
        abstract_params = abstract_with_shardings(nnx.to_pure_dict(abstract), shardings)
    elif dtype is not None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
            nnx.to_pure_dict(abstract),
        )
    _, params, _ = load_params(checkpoint, abstract_params)
    return Loaded(cfg, graphdef, params, tokenizer, mesh)


def from_checkpoint(
    checkpoint: str,
    prompts: Sequence[str] = (),
    prompt_ids: Sequence[Sequence[int]] = (),
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_sequences: Sequence[str] = (),
    mesh=None,
    need_text: bool = False,
) -> tuple[list[list[int]], list[str] | None]:
    """Generate from a checkpoint (converted, or a training workdir's latest step),
    optionally on a mesh (see `load`).

    Returns the new ids per prompt and, when the checkpoint has a tokenizer, their text
    (continuation_text). Stop sequences cut both: the text at the first stop sequence,
    the ids before the token in which it begins (cut_ids_at_stop). Text prompts, stop
    sequences and need_text (the caller prints text) need the checkpoint's tokenizer:
    without one they are a ValueError, raised (like every check of the request) before
    the weights are read."""
    cfg, tokenizer = read_checkpoint_info(checkpoint)
    stop_sequences = [s for s in stop_sequences if s]
    if tokenizer is None:
        if prompts:
            raise ValueError(
                f"{checkpoint} has no tokenizer: give --prompt-ids instead of --prompt"
            )
        if need_text:
            raise ValueError(
                f"{checkpoint} has no tokenizer, so its output cannot be decoded to text: "
                "use --format ids"
            )
        if stop_sequences:
            raise ValueError(
                f"{checkpoint} has no tokenizer, so text stop sequences (--stop) cannot be "
                "matched: give stop token ids (--stop-id)"
            )
    ids = [tokenizer.encode(p) for p in prompts] if prompts else [list(p) for p in prompt_ids]
    if tokenizer is not None and not sampling.stop_ids:
        sampling = dataclasses.replace(sampling, stop_ids=(tokenizer.eos_id,))
    check_request(cfg, ids, sampling)
    loaded = load(checkpoint, mesh, info=(cfg, tokenizer))
    new = loaded.generate(ids, sampling, seed)
    if tokenizer is None:
        return new, None
    texts, cut = [], []
    for p, n in zip(fit_prompts(cfg, ids, sampling), new, strict=True):  # the ids it saw
        texts.append(cut_at_stop(continuation_text(tokenizer, p, n), stop_sequences))
        cut.append(
            cut_ids_at_stop(functools.partial(continuation_text, tokenizer, p), n, stop_sequences)
        )
    return cut, texts
