"""GPT-3 6.7B: 32 layers x 4096, 32 heads x 128, batch 2M tokens, LR 1.2e-4.

Table 2.1 of Brown et al. 2020 with the recipe of its section 2.3 / appendix B, built by
configs/_common.py (read it for the choices shared by all sizes: tokenizer, data,
token-to-step conversion, microbatch of 16 sequences, attention band of 256, remat,
mesh). Needs --config.tokenizer.path=DIR (DIR holding GPT-2's encoder.json and
vocab.bpe) and, for a real run, --config.data.sources.

Batch ramp over the first ~12B tokens (the high end of the paper's 4-12B: the
ramp length grows with the final batch, 4B at 0.5M, 8B at 1M, 12B at 2M and 3.2M).
"""

import importlib.util
from pathlib import Path

from gptjax.config import Config, MeshConfig

# configs/ is loaded by file path, not as a package: load the shared helper by its path.
_spec = importlib.util.spec_from_file_location(
    "gptjax_configs_common", Path(__file__).resolve().parent.parent / "_common.py"
)
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config() -> Config:
    return _common.gpt3(
        n_layer=32,
        d_model=4096,
        n_head=32,
        d_head=128,
        batch_size=1024,
        lr=1.2e-4,
        ramp_tokens=12e9,
        remat="full",
        mesh=MeshConfig(data=1, fsdp=-1),
    )
