"""lm-evaluation-harness model "gptjax": run any lm-eval task on a gptjax checkpoint.

    import lm_eval
    from gptjax.eval.lm_eval_adapter import GptjaxLM   # registers "gptjax"
    lm_eval.simple_evaluate(model=GptjaxLM(checkpoint="DIR"), tasks=["hellaswag"])
    # or: simple_evaluate(model="gptjax", model_args="checkpoint=DIR,batch_size=32", ...)
    # model_args may add dtype=bfloat16: the weights are read, and scored, in bfloat16;
    # compile_cache=false: do not keep compiled programs in ~/.cache/gptjax/jax
    # Several JAX processes: run the same script in each (see GptjaxLM); write the
    # results where GptjaxLM.is_writer.

lm-eval's TemplateLM does the tokenisation (context/continuation split, empty contexts
as EOS); the scoring is gptjax.eval.scoring's, the same code `gptjax eval` runs, so the
two agree token for token. This module imports lm_eval; nothing else in gptjax does.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (lm-eval's own models first; see below)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from gptjax.eval.scoring import EvalModel


# lm-eval fills its registry with its built-in models (a lazy table, no torch) only when
# the registry is empty: registering "gptjax" first would hide "hf" and the others.
@register_model("gptjax")
class GptjaxLM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int | str = 32,
        mesh: str = "data=-1",
        max_gen_toks: int = 256,
        dtype: str | None = None,
        model: EvalModel | None = None,
        compile_cache: bool | str = True,
        **_ignored,
    ):
        super().__init__()
        if model is None:
            if not checkpoint:
                raise ValueError("the gptjax model needs checkpoint=DIR")
            from gptjax import distributed
            from gptjax.config import DistributedConfig
            from gptjax.eval.compile_cache import compile_cache_dir, use_compile_cache
            from gptjax.sharding import make_mesh

            # One process of several (launched as `gptjax eval` is: SLURM, a TPU pod, or
            # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID): every process
            # runs the same lm-eval script over all requests, in the same order, and the
            # scoring spans all of them. rank stays 0 and world_size 1 for lm-eval: its
            # own splitting of documents by rank would break that lockstep.
            distributed.initialize(DistributedConfig())
            if str(compile_cache).lower() not in ("false", "0", "no"):
                use_compile_cache(compile_cache_dir())

            bs = int(batch_size) if str(batch_size).isdigit() else 32
            model = EvalModel.load(
                checkpoint, mesh=make_mesh(str(mesh)), batch_size=bs, dtype=dtype or None
            )
        self.model = model
        self.max_gen_toks = int(max_gen_toks)

    @property
    def is_writer(self) -> bool:
        """Whether this process should write the results (process 0 of several)."""
        import jax

        return jax.process_index() == 0

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.n_ctx

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.model.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scored = self.model.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, scored, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        ids = [self.tok_encode(t) for t in texts]
        lls = self.model.scorer.rolling(ids, self.eot_token_id)
        for text, ll in zip(texts, lls, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return lls

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = dict(req.args[1] or {})
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0):
                raise ValueError("the gptjax lm-eval model generates greedily or by beam search")
            beams = (int(kwargs.get("num_beams", 1)), float(kwargs.get("length_penalty", 1.0)))
            groups.setdefault((tuple(until), max_new, beams), []).append(i)
        for (until, max_new, beams), idx in groups.items():
            contexts = [requests[i].args[0] for i in idx]
            texts = self.model.generate(contexts, until, max_new, *beams)
            for i, text in zip(idx, texts, strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]
