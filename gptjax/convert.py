"""Checkpoint conversion: Hugging Face GPT-2 and llama2.c into gptjax, gptjax out to GPT-2.

Importers read the foreign weights, check every name, shape and size against the
architecture the input declares, build the whole gptjax parameter tree in memory and
only then write it through `gptjax.checkpoint.save_params` (atomic: a temporary
directory renamed when complete). Any problem with the input is a `ConvertError`
naming the file and what is wrong, raised before anything is written.

Formats:
  hf-gpt2   a Hugging Face GPT-2 directory: config.json + model.safetensors (or a
            sharded *.index.json, or pytorch_model.bin read with weights_only=True),
            plus the GPT-2 BPE files vocab.json/merges.txt or encoder.json/vocab.bpe.
  llama2c   a karpathy/llama2.c version-0 ("legacy_export") model.bin (no tokenizer:
            give one with --tokenizer, or use the checkpoint with token ids).

An import records a tokenizer given as `tokenizer` (`gptjax convert --tokenizer PATH`:
a SentencePiece .model file, or a directory with GPT-2 BPE encoder.json + vocab.bpe),
refused when it has more ids than the model embeds.

torch, transformers and safetensors are imported only inside the functions that need
them, so importing this module (and the CLI) stays light.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class ConvertError(ValueError):
    """An input that cannot be converted, or an output that cannot be written."""


# ----------------------------------------------------------------------------- helpers


class _Tensor:
    """A named tensor whose shape is known before its data is read."""

    def __init__(self, shape, dtype: str, load: Callable[[], np.ndarray], origin: str):
        self.shape, self.dtype, self._load, self.origin = tuple(shape), dtype, load, origin

    def load(self) -> np.ndarray:
        return self._load()


def _check_output_dir(output_dir) -> Path:
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConvertError(f"output directory {out} exists and is not empty; refusing to overwrite")
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with zero rows appended up to `rows` (the padded vocabulary)."""
    out = np.zeros((rows, *x.shape[1:]), np.float32)
    out[: x.shape[0]] = x
    return out


def _f32(t: _Tensor) -> np.ndarray:
    a = np.asarray(t.load(), dtype=np.float32)
    if not np.isfinite(a).all():
        raise ConvertError(f"{t.origin}: holds NaN or infinite values (a damaged file?)")
    return a


def _finish(cfg, params: dict, tokenizer: dict | None, output: Path, source: str) -> Path:
    """Check the tree against the model the config builds, then write the checkpoint."""
    from gptjax import config as config_lib
    from gptjax.checkpoint import save_params

    try:
        cfg = config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        raise ConvertError(
            f"{source}: the converted model is not a valid gptjax config: {e}"
        ) from None
    params = _to_contiguous(params)
    want = _model_shapes(cfg.model)
    have_shapes = _shapes(params)
    want_shapes = _shapes(want)
    if have_shapes != want_shapes:
        diffs = [
            f"{k}: converted {have_shapes.get(k)} vs model {want_shapes.get(k)}"
            for k in sorted(set(have_shapes) | set(want_shapes))
            if have_shapes.get(k) != want_shapes.get(k)
        ]
        raise ConvertError(
            f"{source}: converted parameters do not fit the gptjax model: " + "; ".join(diffs[:8])
        )
    out = save_params(output, config_lib.to_dict(cfg), params, tokenizer)
    n = sum(int(np.prod(s)) for s in have_shapes.values())
    log.info("converted %s -> %s (%.1fM parameters)", source, out, n / 1e6)
    return out


def _model_shapes(model_cfg) -> dict:
    """The parameter tree (ShapeDtypeStructs) that gptjax's model builds for model_cfg."""
    from flax import nnx

    from gptjax import model as model_lib

    return nnx.to_pure_dict(model_lib.abstract_model(model_cfg)[1])


def _to_contiguous(tree):
    if isinstance(tree, dict):
        return {k: _to_contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def _shapes(tree, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_shapes(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = tuple(v.shape)
    return out


# ----------------------------------------------------------------------------- readers

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_dtype(name: str):
    if name == "BF16":
        import ml_dtypes  # a jax dependency

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_ST_DTYPES[name]) if name in _ST_DTYPES else None


def _read_safetensors(path: Path) -> dict[str, _Tensor]:
    """Tensors of a .safetensors file (8-byte little-endian header length, a JSON header
    of {name: {dtype, shape, data_offsets}}, then the data), memory-mapped, every entry
    checked against the file's size so a truncated file is an error, not garbage."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: {size} bytes is too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ConvertError(
                f"{path}: header of {n} bytes runs past the end of the {size}-byte file "
                "(truncated, or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: unreadable safetensors header ({e})") from None
    start = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for {name!r}") from None
        dtype = _safetensors_dtype(dtype_name)
        if start + end > size:
            raise ConvertError(
                f"{path}: tensor {name!r} ends at byte {start + end} but the file has {size} "
                "bytes (truncated?)"
            )
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise ConvertError(
                f"{path}: tensor {name!r} has {end - begin} bytes, not the "
                f"{math.prod(shape) * dtype.itemsize} its shape {shape} and dtype {dtype_name} need"
            )

        def load(name=name, dtype=dtype, dtype_name=dtype_name, b=begin, e=end, shape=shape):
            if dtype is None:
                raise ConvertError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
            return data[start + b : start + e].view(dtype).reshape(shape)

        out[name] = _Tensor(shape, dtype_name, load, f"{path}: {name}")
    return out


def _torch_bin_truncation(path: Path) -> str:
    """Why the PyTorch file at path is truncated, or '' when its structure is complete.
    Read without unpickling anything: a zip-format file (torch >= 1.6) must have its
    central directory (at the very end) and every member inside the file; a legacy file
    is five pickles (magic number, protocol, system info, the state dict, storage keys;
    walked opcode by opcode with pickletools, nothing executed) and then the storages."""
    import pickletools
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            try:
                with zipfile.ZipFile(path) as z:
                    ends = [i.header_offset + i.compress_size for i in z.infolist()]
            except (zipfile.BadZipFile, OSError, ValueError):
                return f"a zip-format file without its central directory ({size} bytes)"
            if any(e > size for e in ends):
                return f"zip members run past the end of the {size}-byte file"
            return ""
        if not head.startswith(b"\x80"):  # not a pickle (PROTO opcode) either
            return ""
        f.seek(0)
        n_keys = 0
        for what in ("magic number", "protocol", "system info", "state dict", "storage keys"):
            try:
                # The storage keys pickle is a list of strings, one per storage.
                n_keys = sum(isinstance(arg, str) for _, arg, _ in pickletools.genops(f))
            except Exception:  # exhausted before STOP, or an argument cut short
                if f.tell() >= size:
                    return f"the file ends inside its {what} pickle, at byte {size}"
                return ""  # damaged rather than short: let torch's error speak
        if n_keys and f.tell() >= size:
            return f"the file ends after its pickles, before the {n_keys} tensor storages"
    return ""


def _read_torch_bin(path: Path) -> dict[str, _Tensor]:
    """A pytorch_model.bin, loaded with weights_only=True: tensors only, no pickled code.
    A failure is reported as truncation when the file's structure is cut short, as a
    refusal when it pickles objects other than tensors, else as unreadable."""
    import pickle

    import torch

    state = None
    for mmap in (True, False):  # mmap needs the zip format; older files are read whole
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # truncated, not a torch file, refused objects, ...
            if mmap and not isinstance(e, pickle.UnpicklingError):
                continue  # a legacy file (no mmap), or the same error again below
            detail = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            truncated = _torch_bin_truncation(path)
            if truncated or "unexpected EOF" in str(e):
                raise ConvertError(
                    f"{path}: truncated PyTorch weights ("
                    + (truncated or f"{path.stat().st_size} bytes; {detail}")
                    + "): an interrupted download or copy?"
                ) from None
            if isinstance(e, pickle.UnpicklingError):
                raise ConvertError(
                    f"{path}: refused: it holds pickled objects other than tensors, and only "
                    f"weights_only loading is allowed ({detail})"
                ) from None
            raise ConvertError(
                f"{path}: cannot read PyTorch weights ({detail}); damaged, or not a "
                "pytorch_model.bin?"
            ) from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ConvertError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")

        def load(t=t):
            if t.is_floating_point():
                return t.detach().to(torch.float32).numpy()
            return t.detach().numpy()

        out[str(name)] = _Tensor(t.shape, str(t.dtype), load, f"{path}: {name}")
    return out


def _read_hf_weights(input_dir: Path) -> tuple[dict[str, _Tensor], str]:
    """All tensors of a Hugging Face model directory, and a description of their files."""
    candidates = [
        ("model.safetensors", _read_safetensors),
        ("model.safetensors.index.json", _read_safetensors),
        ("pytorch_model.bin", _read_torch_bin),
        ("pytorch_model.bin.index.json", _read_torch_bin),
    ]
    for name, reader in candidates:
        path = input_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return reader(path), str(path)
        index = _read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{path}: has no weight_map")
        tensors: dict[str, _Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = input_dir / str(shard)
            if Path(str(shard)).name != str(shard) or not shard_path.is_file():
                raise ConvertError(f"{path}: shard {shard!r} not found in {input_dir}")
            tensors.update(reader(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConvertError(f"{path}: tensors listed but absent from the shards: {missing[:5]}")
        return tensors, str(path)
    raise ConvertError(
        f"{input_dir}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)"
    )


# ----------------------------------------------------------------------------- HF GPT-2

# Activations that are GPT-2's tanh-approximated GELU (gptjax's gelu), under their HF names.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_GPT2_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers
# (file names, in the order tried): the Hugging Face names, then OpenAI's originals.
_GPT2_TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _gpt2_hparams(config_path: Path) -> dict:
    """GPT-2 sizes from config.json, refusing any setting gptjax's model does not compute."""
    c = _read_json(config_path)
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


def load_tokenizer_arg(path):
    """The tokenizer `gptjax convert --tokenizer PATH` names: a SentencePiece .model
    file, or a directory holding GPT-2 BPE encoder.json + vocab.bpe."""
    from gptjax.config import TokenizerConfig
    from gptjax.tokenizer import TokenizerError, load_tokenizer

    path = Path(path).absolute()
    if not path.exists():
        raise ConvertError(f"--tokenizer {path}: not found")
    kind = "gpt2" if path.is_dir() else "sentencepiece"
    try:
        return load_tokenizer(TokenizerConfig(kind=kind, path=str(path)))
    except TokenizerError as e:
        raise ConvertError(
            f"--tokenizer {path}: not a SentencePiece .model file or a GPT-2 BPE directory "
            f"(encoder.json + vocab.bpe): {e}"
        ) from None


def _check_tokenizer_fits(tokenizer, vocab_size: int, where) -> None:
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConvertError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{vocab_size} embedding rows (vocab_size): not this model's tokenizer"
        )


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
    output = _check_output_dir(output_dir)
    if not input_dir.is_dir():
        raise ConvertError(f"input directory {input_dir} not found")
    hp = _gpt2_hparams(input_dir / "config.json")
    if tokenizer is not None:
        tokenizer, where = load_tokenizer_arg(tokenizer), f"--tokenizer {tokenizer}"
        if any((input_dir / a).is_file() for a, _ in _GPT2_TOKENIZER_FILES):
            log.info("recording %s instead of %s's own tokenizer files", where, input_dir)
    else:
        tokenizer, where = _gpt2_tokenizer(input_dir), str(input_dir)
    _check_tokenizer_fits(tokenizer, hp["vocab_size"], where)
    tensors, source = _read_hf_weights(input_dir)
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
        return _f32(tensors[name])

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
        "wte": _pad_rows(get("wte.weight"), v_pad),
        "wpe": get("wpe.weight"),
        "blocks": blocks,
        "norm_f": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")},
    }
    if not hp["tie_word_embeddings"]:
        params["lm_head"] = _pad_rows(get("lm_head.weight"), v_pad).T
    if tokenizer is None:
        log.warning(
            "%s has no GPT-2 tokenizer files (%s); the checkpoint will have no tokenizer",
            input_dir,
            " or ".join("/".join(p) for p in _GPT2_TOKENIZER_FILES),
        )
    kind = tokenizer.kind if tokenizer is not None else "gpt2"
    cfg = Config(model=model_cfg, tokenizer=TokenizerConfig(kind=kind, path=""))
    record = tokenizer.to_record() if tokenizer is not None else None
    return _finish(cfg, params, record, output, source)


# ----------------------------------------------------------------------------- llama2.c

_LLAMA2C_HEADER = 7 * 4  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
_LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": version-1/2 exports start with it


def _llama2c_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(_LLAMA2C_HEADER)
    if len(raw) < _LLAMA2C_HEADER:
        raise ConvertError(
            f"{path}: {size} bytes is too short for a llama2.c header (7 int32, 28 bytes)"
        )
    values = [int(v) for v in np.frombuffer(raw, "<i4", 7)]
    if int(np.frombuffer(raw[:4], "<u4")[0]) == _LLAMA2C_V1_MAGIC:
        raise ConvertError(
            f"{path}: a llama2.c version-{values[1]} export (magic 'ak42'); only version-0 "
            "(legacy_export) files can be imported: export with --version 0"
        )
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    h = dict(zip(names, values, strict=True))
    h["shared_classifier"] = h["vocab_size"] > 0  # negative: the file carries wcls
    h["vocab_size"] = abs(h["vocab_size"])
    bad = [k for k in names if h[k] <= 0]
    if bad:
        raise ConvertError(
            f"{path}: header fields must be positive: "
            + ", ".join(f"{k}={h[k]}" for k in bad)
            + " (not a llama2.c version-0 file?)"
        )
    d, nh, kv = h["dim"], h["n_heads"], h["n_kv_heads"]
    if d % nh or (d // nh) % 2 or nh % kv:
        raise ConvertError(
            f"{path}: inconsistent header: dim={d}, n_heads={nh}, n_kv_heads={kv} (dim must be "
            "a multiple of n_heads with an even head size, n_heads a multiple of n_kv_heads)"
        )
    return h


def _llama2c_layout(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a version-0 file, in file order, as export.py's legacy_export writes
    them (torch Linear weights are [out, in]) and run.c's memory_map_weights reads them."""
    D, F, L = h["dim"], h["hidden_dim"], h["n_layers"]
    N, K, V, S = h["n_heads"], h["n_kv_heads"], h["vocab_size"], h["seq_len"]
    H = D // N
    layout = [
        ("token_embedding_table", (V, D)),
        ("rms_att_weight", (L, D)),
        ("wq", (L, N * H, D)),
        ("wk", (L, K * H, D)),
        ("wv", (L, K * H, D)),
        ("wo", (L, D, N * H)),
        ("rms_ffn_weight", (L, D)),
        ("w1", (L, F, D)),
        ("w2", (L, D, F)),
        ("w3", (L, F, D)),
        ("rms_final_weight", (D,)),
        ("freq_cis_real", (S, H // 2)),
        ("freq_cis_imag", (S, H // 2)),
    ]
    if not h["shared_classifier"]:
        layout.append(("wcls", (V, D)))
    return layout


def _rope_tables(seq_len: int, head: int, theta: float = 10000.0) -> tuple[np.ndarray, ...]:
    inv_freq = theta ** (-np.arange(0, head, 2, dtype=np.float64) / head)
    angle = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle), np.sin(angle)


def import_llama2c(model_bin, output_dir, tokenizer=None) -> Path:
    """Import a llama2.c version-0 model.bin (Llama 2 architecture) as a gptjax checkpoint.

    The model: rmsnorm (eps 1e-5), interleaved-pair rope (theta 10000), grouped-query
    attention (query head h reads kv head h // (n_heads / n_kv_heads)), SwiGLU
    w2(silu(w1 x) * w3 x), no biases, a classifier tied unless vocab_size < 0.
    The file has no tokenizer: without `tokenizer` (a path for load_tokenizer_arg, e.g.
    the model's SentencePiece .model) the checkpoint works with token ids only.
    """
    from gptjax.config import Config, ModelConfig, TokenizerConfig

    path = Path(model_bin).absolute()
    output = _check_output_dir(output_dir)
    if not path.is_file():
        raise ConvertError(f"llama2.c model file {path} not found")
    h = _llama2c_header(path)
    if tokenizer is not None:
        where = f"--tokenizer {tokenizer} for {path}"
        tokenizer = load_tokenizer_arg(tokenizer)
        _check_tokenizer_fits(tokenizer, h["vocab_size"], where)
    layout = _llama2c_layout(h)
    n_floats = sum(math.prod(shape) for _, shape in layout)
    want, size = _LLAMA2C_HEADER + 4 * n_floats, path.stat().st_size
    if size != want:
        sizes = ", ".join(
            f"{k}={h[k]}"
            for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")
        )
        raise ConvertError(
            f"{path}: the header ({sizes}, seq_len={h['seq_len']}, "
            f"{'shared' if h['shared_classifier'] else 'separate'} classifier) implies "
            f"{want} bytes but the file has {size}: "
            + ("truncated" if size < want else "extra data")
            + ", or not a llama2.c version-0 export"
        )
    flat = np.memmap(path, dtype="<f4", mode="r", offset=_LLAMA2C_HEADER, shape=(n_floats,))
    w, offset = {}, 0
    for name, shape in layout:
        count = math.prod(shape)
        chunk = flat[offset : offset + count].reshape(shape)
        w[name] = _f32(_Tensor(shape, "F32", lambda c=chunk: c, f"{path}: {name}"))
        offset += count

    D, F, L = h["dim"], h["hidden_dim"], h["n_layers"]
    N, K, V, S = h["n_heads"], h["n_kv_heads"], h["vocab_size"], h["seq_len"]
    H = D // N
    # The stored rope tables must be the interleaved-pair rotation gptjax applies:
    # cos/sin(pos * 10000^(-2i/head_size)) for pair (2i, 2i+1) of every head.
    cos, sin = _rope_tables(S, H)
    atol = 1e-4 + 1e-6 * S  # float32 angles: the error grows with the position
    for name, ref in (("freq_cis_real", cos), ("freq_cis_imag", sin)):
        err = float(np.abs(w[name] - ref).max()) if ref.size else 0.0
        if err > atol:
            raise ConvertError(
                f"{path}: {name} differs from rope with theta=10000 over head_size={H} by "
                f"{err:.3g}: a layout or header error, or a rope variant gptjax does not import"
            )

    def t(x):  # [L, out, in] -> [L, in, out]
        return np.swapaxes(x, 1, 2)

    model_cfg = ModelConfig(
        vocab_size=V,
        seq_len=S,
        n_layer=L,
        d_model=D,
        n_head=N,
        n_kv_head=K,
        d_ff=F,
        prenorm=True,
        norm="rmsnorm",
        norm_eps=1e-5,
        position="rope",
        rope_theta=10000.0,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=h["shared_classifier"],
    )
    v_pad = model_cfg.padded_vocab
    params = {
        "wte": _pad_rows(w["token_embedding_table"], v_pad),
        "blocks": {
            "attn": {
                "wq": t(w["wq"]).reshape(L, D, N, H),
                "wk": t(w["wk"]).reshape(L, D, K, H),
                "wv": t(w["wv"]).reshape(L, D, K, H),
                "wo": t(w["wo"]).reshape(L, N, H, D),
            },
            "mlp": {"w_gate": t(w["w1"]), "w_in": t(w["w3"]), "w_out": t(w["w2"])},
            "norm1": {"scale": w["rms_att_weight"]},
            "norm2": {"scale": w["rms_ffn_weight"]},
        },
        "norm_f": {"scale": w["rms_final_weight"]},
    }
    if not h["shared_classifier"]:
        params["lm_head"] = _pad_rows(w["wcls"], v_pad).T
    # llama2.c models use a Llama SentencePiece vocabulary, kept in a separate file.
    kind = tokenizer.kind if tokenizer is not None else "sentencepiece"
    cfg = Config(model=model_cfg, tokenizer=TokenizerConfig(kind=kind, path=""))
    record = tokenizer.to_record() if tokenizer is not None else None
    return _finish(cfg, params, record, output, str(path))


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

    output = _check_output_dir(output_dir)
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
    p = _flatten(params)
    have = {k: tuple(v.shape) for k, v in p.items()}
    want = _shapes(_model_shapes(m))
    if have != want:
        diffs = [
            f"{k}: stored {have.get(k)} vs config {want.get(k)}"
            for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)
        ]
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


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
        _check_output_dir(output)  # nobody wrote there meanwhile
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- dispatch

IMPORTERS = {"hf-gpt2": import_hf_gpt2, "llama2c": import_llama2c}
EXPORTERS = {"hf-gpt2": export_hf_gpt2}


def convert(
    from_format: str | None,
    to_format: str | None,
    input: str,
    output: str,
    tokenizer: str | None = None,
) -> Path:
    """`--from FORMAT`: import INPUT (foreign) into a gptjax checkpoint at OUTPUT, with
    the tokenizer at `tokenizer` recorded when given; `--to FORMAT`: export the gptjax
    checkpoint INPUT to OUTPUT."""
    if bool(from_format) == bool(to_format):
        raise ConvertError(
            "give exactly one of --from (import into gptjax: "
            f"{', '.join(IMPORTERS)}) or --to (export from gptjax: {', '.join(EXPORTERS)})"
        )
    if from_format:
        if from_format not in IMPORTERS:
            raise ConvertError(
                f"unknown --from format {from_format!r}: one of {', '.join(IMPORTERS)}"
            )
        return IMPORTERS[from_format](input, output, tokenizer=tokenizer)
    if tokenizer:
        raise ConvertError(
            "--tokenizer applies to imports (--from); an export writes the checkpoint's own"
        )
    if to_format not in EXPORTERS:
        raise ConvertError(f"unknown --to format {to_format!r}: one of {', '.join(EXPORTERS)}")
    return EXPORTERS[to_format](input, output)
