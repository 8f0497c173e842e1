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

Modules: readers (the foreign files), output (the gptjax checkpoint an import writes),
hf_gpt2 (import and export), llama2c (import). torch and safetensors are imported only
inside the functions that need them, so importing this package (and the CLI) stays light.
"""

from __future__ import annotations

from pathlib import Path

from gptjax.convert.hf_gpt2 import export_hf_gpt2, import_hf_gpt2
from gptjax.convert.llama2c import import_llama2c
from gptjax.convert.output import load_tokenizer_arg
from gptjax.convert.readers import ConvertError

__all__ = [
    "EXPORTERS",
    "IMPORTERS",
    "ConvertError",
    "convert",
    "export_hf_gpt2",
    "import_hf_gpt2",
    "import_llama2c",
    "load_tokenizer_arg",
]

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
