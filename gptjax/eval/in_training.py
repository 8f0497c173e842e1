"""Few-shot evaluation inside the training loop (train.eval_tasks, docs/eval.md).

The tasks are read once, before any data work, so a bad one stops the run at once. The
scorer is built once, on the training mesh, and is handed the in-memory parameters at
every train.eval_every: nothing is saved or reloaded, the compiled scoring programs are
reused from one evaluation to the next, and each request is tokenised once.

The numbers are those of a separate `gptjax eval --checkpoint` of the same step: the
same harness and scorer, in the dtype that command defaults to (the model's compute
dtype: float32 parameters of a bfloat16-compute model are cast first, as the
checkpoint read casts them), with its default decoding options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from gptjax.config import ConfigError, EvalTaskSpec, ModelConfig, parse_eval_task
from gptjax.eval.harness import RunOptions, evaluate_task
from gptjax.eval.scoring import EvalModel
from gptjax.eval.tasks import EvalInputError, Task, resolve_task


def load_tasks(specs: Sequence[str], tfds_data_dir: str = "") -> list[tuple[EvalTaskSpec, Task]]:
    """train.eval_tasks -> (spec, Task) pairs; a task that cannot be read is a
    ConfigError naming the entry."""
    out = []
    for text in specs:
        spec = parse_eval_task(text)
        try:
            task = resolve_task(spec.task, tfds_data_dir=tfds_data_dir or None)
        except (EvalInputError, OSError, ValueError) as e:
            raise ConfigError(f"train.eval_tasks: {text!r}: {e}") from None
        if not task.examples:
            raise ConfigError(f"train.eval_tasks: {text!r}: the task has no examples")
        out.append((spec, task))
    return out


def metric_key(task: str, metric: str) -> str:
    """The metrics.jsonl / TensorBoard name of a task's metric."""
    return f"eval/{task}/{metric}"


class TrainingEval:
    """Scores the tasks on the training parameters: __call__(params) -> {eval/T/M: value}.
    Every process calls it (the scoring is sharded over all of them)."""

    def __init__(self, tasks: list[tuple[EvalTaskSpec, Task]], cfg: ModelConfig, tokenizer, mesh):
        self.tasks, self.tokenizer, self.mesh = tasks, tokenizer, mesh
        self.cast = cfg.param_dtype != cfg.compute_dtype
        self.cfg = dataclasses.replace(cfg, param_dtype=cfg.compute_dtype)
        self.model: EvalModel | None = None

    def __call__(self, params) -> dict[str, float]:
        import jax

        if self.cast:
            params = jax.tree.map(lambda x: x.astype(self.cfg.compute_dtype), params)
        if self.model is None:
            self.model = EvalModel.from_params(self.cfg, params, self.tokenizer, mesh=self.mesh)
        else:
            self.model.scorer.set_params(params)
        values = {}
        try:
            for spec, task in self.tasks:
                opts = RunOptions(shots=(spec.shots,), limit=spec.limit)
                result, _ = evaluate_task(self.model, task, spec.shots, opts)
                for metric, stat in result["metrics"].items():
                    values[metric_key(spec.name, metric)] = stat["value"]
        finally:  # the weights are the next step's donated buffers: hold none of them
            self.model.scorer.set_params(None)
        return values
