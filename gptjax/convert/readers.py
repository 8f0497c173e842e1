"""Reading foreign checkpoints without trusting them: safetensors (memory-mapped, every
entry checked against the file's size), PyTorch .bin (weights_only, truncation told
apart from refusal), Hugging Face directories (single or sharded), llama2.c version-0
model.bin. Every problem is a `ConvertError` naming the file.

torch is imported only inside the function that reads a .bin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np


class ConvertError(ValueError):
    """An input that cannot be converted, or an output that cannot be written."""


class Tensor:
    """A named tensor whose shape is known before its data is read."""

    def __init__(self, shape, dtype: str, load: Callable[[], np.ndarray], origin: str):
        self.shape, self.dtype, self._load, self.origin = tuple(shape), dtype, load, origin

    def load(self) -> np.ndarray:
        return self._load()


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def f32(t: Tensor) -> np.ndarray:
    a = np.asarray(t.load(), dtype=np.float32)
    if not np.isfinite(a).all():
        raise ConvertError(f"{t.origin}: holds NaN or infinite values (a damaged file?)")
    return a


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


def _read_safetensors(path: Path) -> dict[str, Tensor]:
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

        out[name] = Tensor(shape, dtype_name, load, f"{path}: {name}")
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


TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file


def _plain_pickle(path: Path) -> bool:
    """Whether the file is a pickle but not torch.save's (whose zip format starts "PK" and
    whose legacy format starts with a pickle of TORCH_MAGIC): read with pickletools,
    nothing executed. A first pickle cut short is not called plain."""
    import pickletools

    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            return False
        f.seek(0)
        try:
            args = [arg for op, arg, _ in pickletools.genops(f) if op.name != "PROTO"]
        except Exception:  # not a pickle, or cut short
            return False
    return [a for a in args if a is not None] != [TORCH_MAGIC]


def _read_torch_bin(path: Path) -> dict[str, Tensor]:
    """A pytorch_model.bin, loaded with weights_only=True: tensors only, no pickled code.
    A failure is reported as truncation when the file's structure is cut short, as a
    refusal when it pickles objects other than tensors, else as unreadable."""
    import pickle

    if _plain_pickle(path):
        raise ConvertError(
            f"{path}: not a torch.save file (a plain pickle): pickled objects refused"
        )
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"{path}: .bin weights need torch: install the `reference` extra (pip install "
            "'gptjax[reference]') or torch; model.safetensors needs nothing more"
        ) from None

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

        out[str(name)] = Tensor(t.shape, str(t.dtype), load, f"{path}: {name}")
    return out


def read_hf_weights(input_dir: Path) -> tuple[dict[str, Tensor], str]:
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
        index = read_json(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{path}: has no weight_map")
        tensors: dict[str, Tensor] = {}
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


# ----------------------------------------------------------------------------- llama2.c

_LLAMA2C_HEADER = 7 * 4  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
_LLAMA2C_V1_MAGIC = 0x616B3432  # "ak42": version-1/2 exports start with it


def llama2c_header(path: Path) -> dict:
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


def read_llama2c(path: Path, h: dict) -> dict[str, np.ndarray]:
    """The float32 tensors of a llama2.c version-0 model.bin whose header (from
    llama2c_header) is h, each checked finite; the file's size must be exactly what
    the header implies."""
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
        w[name] = f32(Tensor(shape, "F32", lambda c=chunk: c, f"{path}: {name}"))
        offset += count
    return w
