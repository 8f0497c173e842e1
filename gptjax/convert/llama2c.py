"""llama2.c -> gptjax: a karpathy/llama2.c version-0 ("legacy_export") model.bin as a
gptjax checkpoint of the Llama 2 architecture (no tokenizer in the file: give one with
--tokenizer, or use the checkpoint with token ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptjax.convert.output import (
    check_output_dir,
    check_tokenizer_fits,
    finish,
    load_tokenizer_arg,
    pad_rows,
)
from gptjax.convert.readers import ConvertError, llama2c_header, read_llama2c


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
    output = check_output_dir(output_dir)
    if not path.is_file():
        raise ConvertError(f"llama2.c model file {path} not found")
    h = llama2c_header(path)
    if tokenizer is not None:
        where = f"--tokenizer {tokenizer} for {path}"
        tokenizer = load_tokenizer_arg(tokenizer)
        check_tokenizer_fits(tokenizer, h["vocab_size"], where)
    w = read_llama2c(path, h)

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
        "wte": pad_rows(w["token_embedding_table"], v_pad),
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
        params["lm_head"] = pad_rows(w["wcls"], v_pad).T
    # llama2.c models use a Llama SentencePiece vocabulary, kept in a separate file.
    kind = tokenizer.kind if tokenizer is not None else "sentencepiece"
    cfg = Config(model=model_cfg, tokenizer=TokenizerConfig(kind=kind, path=""))
    record = tokenizer.to_record() if tokenizer is not None else None
    return finish(cfg, params, record, output, str(path))
