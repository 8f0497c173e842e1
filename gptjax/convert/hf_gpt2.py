"""Hugging Face GPT-2 <-> gptjax: import a GPT-2 directory (config.json + model.safetensors,
a sharded *.index.json, or pytorch_model.bin; the GPT-2 BPE files vocab.json/merges.txt
or encoder.json/vocab.bpe), and export a GPT-2-architecture checkpoint as a directory
GPT2LMHeadModel.from_pretrained loads. safetensors is imported only when exporting."""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from gptjax.convert.output import (
    check_output_dir,
    check_tokenizer_fits,
    finish,
    flatten,
    load_tokenizer_arg,
    model_shapes,
    pad_rows,
    shape_diffs,
    shapes,
)
from gptjax.convert.readers import ConvertError, f32, read_hf_weights, read_json

log = logging.getLogger(__name__)

# Activations that are GPT-2's tanh-approximated GELU (gptjax's gelu), under their HF names.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_GPT2_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers
# (file names, in the order tried): the Hugging Face names, then OpenAI's originals.
_GPT2_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _gpt2_hparams(config_path: Path) -> dict:
    """GPT-2 sizes from config.json, refusing any setting gptjax's model does not compute."""
    c = read_json(config_path)
    model_type = c.get("model_type")
    if model_type != "gpt2":
        raise ConvertError(
            f"{config_path}: model_type is {model_type!r}; only GPT-2 (model_type 'gpt2') "
            "can be imported with --from hf-gpt2"
        )
    if "n_positions" not in c and "n_ctx" in c:  # very old configs
        c["n_positions"] = c["n_ctx"]
    hp = {}
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        value = c.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"{config_path}: {key} must be a positive integer, got {value!r}")
        hp[key] = value
    n_inner = c.get("n_inner")
    if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int)):
        raise ConvertError(f"{config_path}: n_inner must be null or an integer, got {n_inner!r}")
    hp["n_inner"] = n_inner or 4 * hp["n_embd"]
    if hp["n_embd"] % hp["n_head"]:
        raise ConvertError(
            f"{config_path}: n_embd={hp['n_embd']} is not divisible by n_head={hp['n_head']}"
        )
    eps = c.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConvertError(f"{config_path}: layer_norm_epsilon must be positive, got {eps!r}")
    hp["layer_norm_epsilon"] = float(eps)
    act = c.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise ConvertError(
            f"{config_path}: activation_function {act!r} is not supported; gptjax computes "
            f"GPT-2's tanh GELU ({', '.join(_TANH_GELUS)})"
        )
    refusals = {
        "scale_attn_weights": (True, "attention without the 1/sqrt(head_dim) scale"),
        "scale_attn_by_inverse_layer_idx": (False, "attention scaled by 1/(layer+1)"),
        "add_cross_attention": (False, "cross-attention layers"),
    }
    for key, (supported, what) in refusals.items():
        if bool(c.get(key, supported)) != supported:
            raise ConvertError(
                f"{config_path}: {key}={c.get(key)!r} is not supported ({what} is not part "
                "of gptjax's model)"
            )
    # reorder_and_upcast_attn only computes the same scores in f32 in another order:
    # the function is unchanged, so it is accepted (gptjax's softmax is f32 anyway).
    hp["tie_word_embeddings"] = bool(c.get("tie_word_embeddings", True))
    return hp


def _gpt2_tokenizer(input_dir: Path):
    """The GPT2Tokenizer of the directory's BPE files, or None when there are none."""
    from gptjax.tokenizer import GPT2Tokenizer, TokenizerError

    for enc_name, bpe_name in _GPT2_TOKENIZER_FILES:
        enc, bpe = input_dir / enc_name, input_dir / bpe_name
        if enc.is_file() and bpe.is_file():
            try:
                return GPT2Tokenizer(enc.read_bytes(), bpe.read_bytes(), origin=str(enc))
            except TokenizerError as e:
                raise ConvertError(
                    f"{enc} + {bpe_name}: not a GPT-2 byte-level BPE tokenizer gptjax can use: {e}"
                ) from None
    for enc_name, bpe_name in _GPT2_TOKENIZER_FILES:
        present = [n for n in (enc_name, bpe_name) if (input_dir / n).is_file()]
        if len(present) == 1:
            other = bpe_name if present[0] == enc_name else enc_name
            raise ConvertError(
                f"{input_dir}: has {present[0]} but not {other}; a GPT-2 tokenizer needs both"
            )
    return None


def import_hf_gpt2(input_dir, output_dir, tokenizer=None) -> Path:
    """Import a Hugging Face GPT-2 directory (any size) as a gptjax checkpoint.

    tokenizer: a path for load_tokenizer_arg, recorded instead of the directory's own
    GPT-2 BPE files.

    Conv1D weights are [in, out]; c_attn packs q, k, v along `out`, each head-major.
    The embedding is padded with zero rows to the config's padded vocabulary. Dropout
    is a training choice, not part of the weights: the config keeps gptjax's 0.0
    (set --config.model.dropout to fine-tune with GPT-2's 0.1).
    """
    from gptjax.config import Config, ModelConfig, TokenizerConfig

    input_dir = Path(input_dir).absolute()
    output = check_output_dir(output_dir)
    if not input_dir.is_dir():
        raise ConvertError(f"input directory {input_dir} not found")
    hp = _gpt2_hparams(input_dir / "config.json")
    if tokenizer is not None:
        tokenizer, where = load_tokenizer_arg(tokenizer), f"--tokenizer {tokenizer}"
        if any((input_dir / a).is_file() for a, _ in _GPT2_TOKENIZER_FILES):
            log.info("recording %s instead of %s's own tokenizer files", where, input_dir)
    else:
        tokenizer, where = _gpt2_tokenizer(input_dir), str(input_dir)
    check_tokenizer_fits(tokenizer, hp["vocab_size"], where)
    tensors, source = read_hf_weights(input_dir)
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}

    L, D, N = hp["n_layer"], hp["n_embd"], hp["n_head"]
    V, P, F = hp["vocab_size"], hp["n_positions"], hp["n_inner"]
    H = D // N
    spec = {"wte.weight": (V, D), "wpe.weight": (P, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(L):
        spec.update(
            {
                f"h.{i}.ln_1.weight": (D,),
                f"h.{i}.ln_1.bias": (D,),
                f"h.{i}.attn.c_attn.weight": (D, 3 * D),
                f"h.{i}.attn.c_attn.bias": (3 * D,),
                f"h.{i}.attn.c_proj.weight": (D, D),
                f"h.{i}.attn.c_proj.bias": (D,),
                f"h.{i}.ln_2.weight": (D,),
                f"h.{i}.ln_2.bias": (D,),
                f"h.{i}.mlp.c_fc.weight": (D, F),
                f"h.{i}.mlp.c_fc.bias": (F,),
                f"h.{i}.mlp.c_proj.weight": (F, D),
                f"h.{i}.mlp.c_proj.bias": (D,),
            }
        )
    if not hp["tie_word_embeddings"]:
        spec["lm_head.weight"] = (V, D)
    missing = [k for k in spec if k not in tensors]
    if missing:
        raise ConvertError(
            f"{source}: missing {len(missing)} GPT-2 tensors for the config.json sizes "
            f"(n_layer={L}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
        )
    wrong = [
        f"{k} is {tensors[k].shape}, expected {shape}"
        for k, shape in spec.items()
        if tensors[k].shape != shape
    ]
    if wrong:
        raise ConvertError(
            f"{source}: tensor shapes do not match config.json (n_layer={L}, n_embd={D}, "
            f"n_head={N}, n_positions={P}, vocab_size={V}): " + "; ".join(wrong[:6])
        )
    ignorable = {"lm_head.weight"} if hp["tie_word_embeddings"] else set()
    unexpected = sorted(
        k
        for k in tensors
        if k not in spec and k not in ignorable and not _GPT2_BUFFERS.fullmatch(k)
    )
    if unexpected:
        raise ConvertError(
            f"{source}: unexpected tensors for a GPT-2 of {L} layers (another architecture?): "
            + ", ".join(unexpected[:6])
            + (" ..." if len(unexpected) > 6 else "")
        )

    def get(name):
        return f32(tensors[name])

    model_cfg = ModelConfig(
        vocab_size=V,
        seq_len=P,
        n_layer=L,
        d_model=D,
        n_head=N,
        d_ff=F,
        prenorm=True,
        norm="layernorm",
        norm_eps=hp["layer_norm_epsilon"],
        position="learned",
        mlp="gelu",
        use_bias=True,
        tie_embeddings=hp["tie_word_embeddings"],
    )
    layers: dict[str, list[np.ndarray]] = {}
    for i in range(L):
        c_attn = get(f"h.{i}.attn.c_attn.weight")  # Conv1D: [in, out]; out is q|k|v, head-major
        c_attn_b = get(f"h.{i}.attn.c_attn.bias")
        per_layer = {
            "attn/wq": c_attn[:, :D].reshape(D, N, H),
            "attn/wk": c_attn[:, D : 2 * D].reshape(D, N, H),
            "attn/wv": c_attn[:, 2 * D :].reshape(D, N, H),
            "attn/bq": c_attn_b[:D].reshape(N, H),
            "attn/bk": c_attn_b[D : 2 * D].reshape(N, H),
            "attn/bv": c_attn_b[2 * D :].reshape(N, H),
            "attn/wo": get(f"h.{i}.attn.c_proj.weight").reshape(N, H, D),
            "attn/bo": get(f"h.{i}.attn.c_proj.bias"),
            "mlp/w_in": get(f"h.{i}.mlp.c_fc.weight"),
            "mlp/b_in": get(f"h.{i}.mlp.c_fc.bias"),
            "mlp/w_out": get(f"h.{i}.mlp.c_proj.weight"),
            "mlp/b_out": get(f"h.{i}.mlp.c_proj.bias"),
            "norm1/scale": get(f"h.{i}.ln_1.weight"),
            "norm1/bias": get(f"h.{i}.ln_1.bias"),
            "norm2/scale": get(f"h.{i}.ln_2.weight"),
            "norm2/bias": get(f"h.{i}.ln_2.bias"),
        }
        for k, v in per_layer.items():
            layers.setdefault(k, []).append(v)
    blocks: dict = {}
    for k, v in layers.items():
        module, name = k.split("/")
        blocks.setdefault(module, {})[name] = np.stack(v)
    v_pad = model_cfg.padded_vocab
    params = {
        "wte": pad_rows(get("wte.weight"), v_pad),
        "wpe": get("wpe.weight"),
        "blocks": blocks,
        "norm_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")},
    }
    if not hp["tie_word_embeddings"]:
        params["lm_head"] = pad_rows(get("lm_head.weight"), v_pad).T
    if tokenizer is None:
        log.warning(
            "%s has no GPT-2 tokenizer files (%s); the checkpoint will have no tokenizer",
            input_dir,
            " or ".join("/".join(p) for p in _GPT2_TOKENIZER_FILES),
        )
    kind = tokenizer.kind if tokenizer is not None else "gpt2"
    cfg = Config(model=model_cfg, tokenizer=TokenizerConfig(kind=kind, path=""))
    record = tokenizer.to_record() if tokenizer is not None else None
    return finish(cfg, params, record, output, source)


# ----------------------------------------------------------------------------- export


def _gpt2_incompatibilities(m) -> list[str]:
    problems = []
    if m.position != "learned":
        problems.append(f"position={m.position} (GPT-2 learns positions)")
    if m.norm != "layernorm":
        problems.append(f"norm={m.norm} (GPT-2 uses layernorm)")
    if m.mlp != "gelu":
        problems.append(f"mlp={m.mlp} (GPT-2 uses gelu)")
    if not m.use_bias:
        problems.append("use_bias=False (GPT-2 has biases)")
    if not m.tie_embeddings:
        problems.append("tie_embeddings=False (GPT2LMHeadModel ties its head)")
    if not m.prenorm:
        problems.append("prenorm=False (GPT-2 is pre-norm)")
    if m.kv_heads != m.n_head:
        problems.append(f"n_kv_head={m.n_kv_head} (GPT-2 is multi-head attention)")
    if m.head_dim * m.n_head != m.d_model:
        problems.append(f"d_head={m.d_head} (GPT-2 needs n_head * head_dim == d_model)")
    if any(m.attention_windows):
        problems.append(f"attention_windows={m.attention_windows} (GPT-2 is dense)")
    return problems


def export_hf_gpt2(checkpoint, output_dir) -> Path:
    """Write a gptjax checkpoint with a GPT-2 architecture as a Hugging Face GPT-2
    directory (config.json, model.safetensors, and vocab.json/merges.txt when the
    checkpoint carries a GPT-2 tokenizer) that GPT2LMHeadModel.from_pretrained loads."""
    from gptjax import config as config_lib
    from gptjax.checkpoint import load_params
    from gptjax.tokenizer import TokenizerError, tokenizer_from_record

    output = check_output_dir(output_dir)
    _safetensors_save_file()  # before any work: a missing package is said at once
    cfg_dict, params, record = load_params(checkpoint)
    try:
        m = config_lib.from_dict(cfg_dict).model
    except config_lib.ConfigError as e:
        raise ConvertError(f"{checkpoint}: unreadable config: {e}") from None
    problems = _gpt2_incompatibilities(m)
    if problems:
        raise ConvertError(
            f"{checkpoint}: not a GPT-2 architecture, cannot export to hf-gpt2: "
            + "; ".join(problems)
        )
    tokenizer = None
    if record:
        try:
            tokenizer = tokenizer_from_record(record)
        except TokenizerError as e:
            raise ConvertError(f"{checkpoint}: unreadable tokenizer record: {e}") from None
    L, D, N, F, V = m.n_layer, m.d_model, m.n_head, m.ffn_dim, m.vocab_size
    p = flatten(params)
    diffs = shape_diffs(shapes(params), shapes(model_shapes(m)), "stored", "config")
    if diffs:
        raise ConvertError(
            f"{checkpoint}: stored parameters do not match its config: " + "; ".join(diffs[:8])
        )

    def a(key):
        return np.asarray(p[key], dtype=np.float32)

    tensors = {
        "transformer.wte.weight": a("wte")[:V],
        "transformer.wpe.weight": a("wpe"),
        "transformer.ln_f.weight": a("norm_f/scale"),
        "transformer.ln_f.bias": a("norm_f/bias"),
    }
    for i in range(L):
        pre = f"transformer.h.{i}."
        wq, wk, wv = (a(f"blocks/attn/{n}")[i].reshape(D, D) for n in ("wq", "wk", "wv"))
        bq, bk, bv = (a(f"blocks/attn/{n}")[i].reshape(D) for n in ("bq", "bk", "bv"))
        tensors.update(
            {
                pre + "ln_1.weight": a("blocks/norm1/scale")[i],
                pre + "ln_1.bias": a("blocks/norm1/bias")[i],
                pre + "attn.c_attn.weight": np.concatenate([wq, wk, wv], axis=1),
                pre + "attn.c_attn.bias": np.concatenate([bq, bk, bv]),
                pre + "attn.c_proj.weight": a("blocks/attn/wo")[i].reshape(D, D),
                pre + "attn.c_proj.bias": a("blocks/attn/bo")[i],
                pre + "ln_2.weight": a("blocks/norm2/scale")[i],
                pre + "ln_2.bias": a("blocks/norm2/bias")[i],
                pre + "mlp.c_fc.weight": a("blocks/mlp/w_in")[i],
                pre + "mlp.c_fc.bias": a("blocks/mlp/b_in")[i],
                pre + "mlp.c_proj.weight": a("blocks/mlp/w_out")[i],
                pre + "mlp.c_proj.bias": a("blocks/mlp/b_out")[i],
            }
        )
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    eos = tokenizer.eos_id if tokenizer is not None and tokenizer.kind == "gpt2" else None
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": V,
        "n_positions": m.seq_len,
        "n_embd": D,
        "n_layer": L,
        "n_head": N,
        "n_inner": None if F == 4 * D else F,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": m.norm_eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.attn_dropout,
        "initializer_range": m.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": "float32",
    }
    files: dict[str, bytes] = {
        "config.json": (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode()
    }
    if tokenizer is not None and tokenizer.kind == "gpt2":
        import base64

        files["vocab.json"] = base64.b64decode(record["encoder_json"])
        files["merges.txt"] = base64.b64decode(record["vocab_bpe"])
    elif tokenizer is not None:
        log.warning(
            "the checkpoint's tokenizer is %s, not GPT-2 BPE: no tokenizer files written",
            tokenizer.kind,
        )
    _write_dir_atomically(output, files, tensors)
    log.info("exported %s -> %s (GPT2LMHeadModel)", checkpoint, output)
    return output


def _safetensors_save_file():
    """safetensors.numpy.save_file, or a ConvertError saying how to get it."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise ConvertError(
            f"exporting to hf-gpt2 writes model.safetensors and needs the safetensors package "
            f"({e}); install it: python3 -m pip install safetensors"
        ) from None
    return save_file


def _write_dir_atomically(output: Path, files: dict[str, bytes], tensors: dict) -> None:
    """Write files + model.safetensors into a temporary sibling, then rename it."""
    save_file = _safetensors_save_file()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        check_output_dir(output)  # nobody wrote there meanwhile
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
