"""`gptjax data prepare --runner beam`: the same per-unit transform as an Apache Beam
pipeline, so a cluster runner (Dataflow, Flink, Spark) can tokenise a large corpus.

Each element is one work unit; its DoFn calls the transform it is given
(gptjax.data.prepare.tokenize_unit, which writes shard k and its info file, exactly as a
local worker does), so the output is the same bytes. The output directory must be on a filesystem every Beam worker writes to
(a shared mount on a cluster). Apache Beam is an optional extra (`pip install
'gptjax[beam]'`) imported only by run_beam.
"""

from __future__ import annotations

import shlex


class BeamMissing(RuntimeError):
    """--runner beam without the `beam` extra installed."""


def beam_args(workers: int, beam_options: str) -> list[str]:
    """--beam-options as given; without a --runner, the DirectRunner on `workers`
    processes (the DirectRunner's own default is one thread)."""
    args = shlex.split(beam_options or "")
    if not any(a.startswith("--runner") for a in args):
        args = [
            "--runner=DirectRunner",
            f"--direct_num_workers={workers}",
            "--direct_running_mode=" + ("multi_processing" if workers > 1 else "in_memory"),
            *args,
        ]
    return args


def run_beam(job, todo, workers: int, beam_options: str, tokenize_unit) -> None:
    """Run tokenize_unit(job, index, pieces, tokenizer) over the (index, pieces) units of
    `todo` as a Beam pipeline (passed in: this module never imports gptjax.data.prepare)."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:  # one clear line from the CLI instead of a traceback
        raise BeamMissing(
            "--runner beam needs Apache Beam, which is not installed: "
            "pip install 'gptjax[beam]' (or use --runner local)"
        ) from None

    class TokenizeUnit(beam.DoFn):
        def setup(self):
            from gptjax.tokenizer import tokenizer_from_record

            self.tokenizer = tokenizer_from_record(job.tokenizer_record)

        def process(self, element):
            index, pieces = element
            yield tokenize_unit(job, index, pieces, self.tokenizer)["tokens"]

    options = PipelineOptions(beam_args(workers, beam_options))
    with beam.Pipeline(options=options) as p:
        _ = p | beam.Create(todo) | beam.Reshuffle() | beam.ParDo(TokenizeUnit())
