"""GPT-3 Small (125M): 12 layers x 768, 12 heads x 64, batch 0.5M tokens, LR 6.0e-4.

Table 2.1 of Brown et al. 2020 with the recipe of its section 2.3 / appendix B, built by
configs/_common.py (read it for the choices shared by all sizes: tokenizer, data,
token-to-step conversion, microbatch of 16 sequences, attention band of 256, remat,
mesh). Needs --config.tokenizer.path=DIR (DIR holding GPT-2's encoder.json and
vocab.bpe) and, for a real run, --config.data.sources.

Batch ramp over the first ~4B tokens (the low end of the paper's 4-12B: the
ramp length grows with the final batch, 4B at 0.5M, 8B at 1M, 12B at 2M and 3.2M).
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
    return _common.gpt3(
        n_layer=12,
        d_model=768,
        n_head=12,
        d_head=64,
        batch_size=256,
        lr=6.0e-4,
        ramp_tokens=4e9,
    )
