"""The gptjax end of every import: the output directory (refused unless empty), the
tokenizer an import records, and the parameter tree checked against the model its
config builds before `gptjax.checkpoint.save_params` writes it (atomically)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gptjax.convert.readers import ConvertError

log = logging.getLogger(__name__)


def check_output_dir(output_dir) -> Path:
    out = Path(output_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConvertError(f"output directory {out} exists and is not empty; refusing to overwrite")
    return out


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x with zero rows appended up to `rows` (the padded vocabulary)."""
    out = np.zeros((rows, *x.shape[1:]), np.float32)
    out[: x.shape[0]] = x
    return out


def finish(cfg, params: dict, tokenizer: dict | None, output: Path, source: str) -> Path:
    """Check the tree against the model the config builds, then write the checkpoint."""
    from gptjax import config as config_lib
    from gptjax.checkpoint import save_params

    try:
        cfg = config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        raise ConvertError(
            f"{source}: the converted model is not a valid gptjax config: {e}"
        ) from None
    params = to_contiguous(params)
    have_shapes = shapes(params)
    diffs = shape_diffs(have_shapes, shapes(model_shapes(cfg.model)), "converted", "model")
    if diffs:
        raise ConvertError(
            f"{source}: converted parameters do not fit the gptjax model: " + "; ".join(diffs[:8])
        )
    out = save_params(output, config_lib.to_dict(cfg), params, tokenizer)
    n = sum(int(np.prod(s)) for s in have_shapes.values())
    log.info("converted %s -> %s (%.1fM parameters)", source, out, n / 1e6)
    return out


def model_shapes(model_cfg) -> dict:
    """The parameter tree (ShapeDtypeStructs) that gptjax's model builds for model_cfg."""
    from flax import nnx

    from gptjax import model as model_lib

    return nnx.to_pure_dict(model_lib.abstract_model(model_cfg)[1])


def to_contiguous(tree):
    if isinstance(tree, dict):
        return {k: to_contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def flatten(tree, prefix: str = "") -> dict:
    """A nested dict as {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shapes(tree) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def shape_diffs(have: dict, want: dict, have_name: str, want_name: str) -> list[str]:
    """'name: {have_name} shape vs {want_name} shape' for each parameter that differs."""
    return [
        f"{k}: {have_name} {have.get(k)} vs {want_name} {want.get(k)}"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]


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


def check_tokenizer_fits(tokenizer, vocab_size: int, where) -> None:
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise ConvertError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{vocab_size} embedding rows (vocab_size): not this model's tokenizer"
        )
