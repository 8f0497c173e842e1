"""SST-2 (GLUE sentiment), classification: [start] sentence [extract].

Trains on the sentence-level SST-2 split (stsa.binary.train, 6,920 sentences, the
'<label> <sentence>' format) and evaluates on the GLUE dev set (872 sentences, tsv).
The paper's defaults (lr 6.25e-5, batch 32, 3 epochs, lambda 0.5) come from
gptjax.finetune.FinetuneConfig.

Give the files with --config.task.train=... --config.task.dev=..., e.g.
sst2/stsa.binary.train and sst2/glue_sst2_dev.tsv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="sst2"),
    )
