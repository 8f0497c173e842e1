"""GPT-3 XL (1.3B): 24 layers x 2048, 16 heads x 128, batch 1M tokens, LR 2.0e-4.

Table 2.1 of Brown et al. 2020 with the recipe of its section 2.3 / appendix B, built by
configs/_common.py (read it for the choices shared by all sizes: tokenizer, data,
token-to-step conversion, microbatch of 16 sequences, attention band of 256, remat,
mesh). Needs --config.tokenizer.path=DIR (DIR holding GPT-2's encoder.json and
vocab.bpe) and, for a real run, --config.data.sources.

Batch ramp over the first ~8B tokens (the paper says 4-12B by size: the ramp
length grows with the final batch here, 4B at 0.5M, 8B at 1M, 12B at 2M and 3.2M).

Table 2.1 prints 24 heads x d_head 128 for XL, but 24 x 128 = 3072 != d_model 2048,
and 24 heads cannot split 2048 evenly (d_head 85.3). Only n_head x d_head = 2048 gives
the printed 1.3B parameters: 24 x 12 x 2048^2 = 1.21B in the blocks + 0.11B
embeddings = 1.32B (d_attn 3072 would give 1.52B). Of the splits of 2048 we keep the
printed d_head 128, i.e. 16 heads, as EleutherAI's GPT-Neo 1.3B and Pythia-1.4B do
(the "24" looks copied from the layer column).
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
        n_layer=24,
        d_model=2048,
        n_head=16,
        d_head=128,
        batch_size=512,
        lr=2.0e-4,
        ramp_tokens=8e9,
        mesh=MeshConfig(data=1, fsdp=-1),
    )
