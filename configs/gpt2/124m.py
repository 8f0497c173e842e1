"""GPT-2 124M: 12 layers x 768, 12 heads. LR 6.0e-4 (GPT-3 Small, 125M).

GPT-2 (Radford et al. 2019): pre-LN blocks with a final LayerNorm, residual projections
initialised with std 0.02 / sqrt(2 n_layer), n_ctx 1024, 50,257-token byte-level BPE,
tied embeddings, batch 512 x 1024. The paper does not publish the LR, optimizer or
schedule; configs/_common.py (gpt2) documents what is borrowed from GPT-3 and why, and
the dropout choice. Needs --config.tokenizer.path=DIR (DIR holding encoder.json and
vocab.bpe) and, for a real run, --config.data.sources.
"""

import importlib.util
from pathlib import Path

from gptjax.config import Config

# configs/ is loaded by file path, not as a package: load the shared helper by its path.
_spec = importlib.util.spec_from_file_location(
    "gptjax_configs_common", Path(__file__).resolve().parent.parent / "_common.py"
)
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config() -> Config:
    return _common.gpt2(
        n_layer=12,
        d_model=768,
        n_head=12,
        lr=6.0e-4,
    )
