"""Scoring requests on the model: batched, length-bucketed, jitted, sharded.

Request kinds, all on token ids:
  loglikelihood  sum log P(continuation | context) and whether greedy decoding would
                 produce it (lm-eval's (logprob, is_greedy)).
  rolling        loglikelihood of a whole text over disjoint windows of n_ctx tokens, as
                 lm-eval's loglikelihood_rolling (first window conditioned on EOS).
  greedy         generation until EOS or max_new tokens (text stop sequences are cut on
                 the host), via gptjax.generate's cached decode loop.

Shared contexts are computed once. Requests with the same context tokens (the options
of a multiple-choice question) form a group: the context is prefilled once into the KV
cache (only its last position goes through the LM head), and all its continuations are
packed into one row of a cached chunk, each as a segment that attends to the context and
to itself only (model.KVCache.chunk_segment_BxT), at the positions it would have alone.
A continuation's last token is never an input, so a segment holds the others. For
HellaSwag that is 1 context + 4 endings of work per question instead of lm-eval's
4 x (context + ending), without padding every ending to the longest one, and the
vocabulary projection runs on continuation tokens only.

Shapes are bucketed so compiles are few: context and packed-chunk lengths to
{8, 16, 24, 32, 48, 64, 96, 128, ...} (powers of two, with 1.5x steps from 16 on;
`length_bucket`; a chunk of 0 where every continuation is one token), rows to powers of
two (and to a multiple of the batch shards); the scored entries are a function of those
(the LM head skips the blocks beyond the real ones). Batches are then padded onto fewer
shapes where that costs less than compiling (gptjax.eval.buckets.fit_shapes), planned
for a whole suite at once (`reserve`), and compiled on worker threads ahead of use.
Padding never changes a number: contexts are left-padded with the padding slots masked
out of attention, chunks right-padded with a segment of their own, and padded rows are
discarded.

On a mesh the parameters keep their derived shardings (fsdp/tensor) and batch rows are
split over (data, fsdp), so the same code evaluates a GPT-3-size checkpoint.

Tokenisation follows lm-eval's TemplateLM exactly (`encode_pair`): trailing spaces of the
context move to the continuation, the continuation's ids are those of context +
continuation after the context's ids, and an empty context becomes [EOS]; inputs longer
than n_ctx are cut from the left, as lm-eval does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig
from gptjax.eval.buckets import fit_shapes, length_bucket, row_bucket
from gptjax.eval.score_program import HEAD_BLOCK, make_score_fn, scoring_head, vocab_chunks
from gptjax.xla_cpu import throttle

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), lm-eval's TemplateLM.loglikelihood convention."""
    if context == "":
        cont = tokenizer.encode(continuation)
        if cont and cont[0] == tokenizer.eos_id:
            return cont[:1], cont[1:]
        return [tokenizer.eos_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, max_len: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) windows covering every token once: lm-eval's
    get_rolling_token_windows + make_disjoint_window."""
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_len - context_len + 1
    first = min(max_len, len(tokens))
    windows = [([prefix_id] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        windows.append((tokens[max(end - max_len - 1, 0) : end - 1], tokens[end - n : end]))
        predicted += n
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def truncate(ctx: Sequence[int], cont: Sequence[int], n_ctx: int) -> tuple[list[int], list[int]]:
    """Cut from the left so the model input (context + continuation minus its last token)
    fits n_ctx; at least one context token always remains."""
    ctx, cont = list(ctx), list(cont)
    if len(cont) > n_ctx:
        log.warning("continuation of %d tokens cut to the last %d (n_ctx)", len(cont), n_ctx)
        ctx, cont = [cont[-n_ctx - 1]], cont[-n_ctx:]
    room = n_ctx + 1 - len(cont)
    if len(ctx) > room:
        ctx = ctx[-room:]
    return ctx, cont


# ----------------------------------------------------------------------------- device


def fetch(x) -> np.ndarray:
    """A result as one host array on every process (with several processes each holds
    only its devices' rows until they are gathered)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class _Group:
    ctx: list[int]
    conts: list[tuple[int, list[int]]]  # (request index, continuation ids)

    @property
    def chunk_len(self) -> int:
        """Tokens of the group's packed chunk: its continuations but their last tokens."""
        return sum(len(c) - 1 for _, c in self.conts)


def _chunk_bucket(n: int) -> int:
    """A packed chunk's length bucket; 0 where every continuation is one token (the
    program then has no chunk pass at all: fewer FLOPs and a faster compile)."""
    return length_bucket(n) if n else 0


class Scorer:
    """Jitted, bucketed scoring of token-level requests for one model (and mesh)."""

    def __init__(
        self,
        graphdef,
        params,
        cfg: ModelConfig,
        *,
        mesh=None,
        batch_size: int = 32,
        token_budget: int = 8192,
        compile_threads: int = 2,
        compile_cost: float = 1.0,
    ):
        self.graphdef, self.params, self.cfg, self.mesh = graphdef, params, cfg, mesh
        self.batch_size, self.token_budget = max(1, batch_size), token_budget
        self.shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._score = jax.jit(make_score_fn(graphdef, cfg))
        tensor = 1 if mesh is None else mesh.shape["tensor"]
        head_fn = partial(scoring_head, cfg=cfg, n_chunks=vocab_chunks(cfg.padded_vocab, tensor))
        self._head_fn = jax.jit(head_fn)
        self.set_params(params)
        self.shapes: set[tuple] = set()  # distinct compiled shapes, for the record
        # shape key -> Future of the compiled scoring program (_compile_ahead)
        self._compiled: dict[tuple, object] = {}
        self._pool = None
        self.compile_threads = compile_threads
        # buckets.fit_shapes trades padding for compiles at this weight of a compile (0:
        # a shape for every need; 1: seconds of compiling against seconds of scoring).
        self.compile_cost = compile_cost
        self._planned: dict[tuple, tuple] = {}  # needed shape -> the shape it runs at
        self._compile_seconds: list[float] = []
        self._token_rate: float | None = None

    def set_params(self, params) -> None:
        """Score with these weights of the same model from now on, keeping every compiled
        program (training's evaluation, at each eval step); None lets the last ones go."""
        self.params = params
        self._head = None if params is None else self._call(self._head_fn, params)

    @property
    def n_ctx(self) -> int:
        return self.cfg.seq_len

    def _place(self, *arrays):
        """Host arrays (the same on every process) -> global arrays split over the batch
        shards; each process fills only the rows of its own devices."""
        if self.mesh is None:
            return [jnp.asarray(a) for a in arrays]
        from gptjax.sharding import batch_sharding

        return [
            jax.make_array_from_callback(a.shape, batch_sharding(self.mesh, a.ndim), a.__getitem__)
            for a in arrays
        ]

    def _call(self, fn, *args):
        if self.mesh is None:
            return fn(*args)
        with jax.set_mesh(self.mesh):
            return fn(*args)

    def _batches(self, groups: list[_Group]) -> list[list[_Group]]:
        """Greedy packing of groups sorted by bucketed (chunk, context) length, longest
        first, under a continuation limit (batch_size) and a chunk-token budget."""

        def key(gr):  # the chunk first: its G x T tokens are most of the model's work
            return (length_bucket(gr.chunk_len), length_bucket(len(gr.ctx)))

        groups = sorted(groups, key=key, reverse=True)
        batches, current, rows, t_max = [], [], 0, 0
        for gr in groups:
            t_new = max(t_max, key(gr)[0])
            too_many = rows + len(gr.conts) > self.batch_size
            if current and (too_many or (len(current) + 1) * t_new > self.token_budget):
                batches.append(current)
                current, rows, t_new = [], 0, key(gr)[0]
            current.append(gr)
            rows += len(gr.conts)
            t_max = t_new
        if current:
            batches.append(current)
        return batches

    def _group_batches(self, requests):
        """Requests -> (results with the empty continuations filled in, batches of groups)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_ctx: dict[tuple[int, ...], _Group] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
                continue
            if not ctx:
                raise ValueError("a request needs at least one context token (use EOS)")
            ctx, cont = truncate(ctx, cont, self.n_ctx)
            by_ctx.setdefault(tuple(ctx), _Group(ctx, [])).conts.append((i, cont))
        # A group is split (its context recomputed per part) into parts of at most
        # batch_size continuations and, beyond one continuation, n_ctx chunk tokens: a
        # chunk's attention is T x T.
        groups = []
        for gr in by_ctx.values():
            part = _Group(gr.ctx, [])
            for i, c in gr.conts:
                full = len(part.conts) >= self.batch_size
                if part.conts and (full or part.chunk_len + len(c) - 1 > self.n_ctx):
                    groups.append(part)
                    part = _Group(gr.ctx, [])
                part.conts.append((i, c))
            groups.append(part)
        return results, self._batches(groups)

    def _needs(self, batches) -> list[tuple[int, int, int]]:
        """The smallest (rows, context, chunk) buckets that hold each batch."""
        return [
            (
                row_bucket(len(b), self.shards),
                length_bucket(max(len(gr.ctx) for gr in b)),
                _chunk_bucket(max(gr.chunk_len for gr in b)),
            )
            for b in batches
        ]

    def _shapes(self, batches) -> list[tuple[int, int, int]]:
        """The (rows, context, chunk) shape each batch runs at: planned by reserve, or
        fitted now (buckets.fit_shapes) against the shapes already compiled."""
        needs = self._needs(batches)
        todo = [n for n in needs if n not in self._planned]
        if todo:
            known = [k[1:] for k in self._compiled]
            fitted = fit_shapes(todo, known, compile_cost=self._compile_tokens())
            self._planned.update(zip(todo, fitted, strict=True))
        return [self._planned[n] for n in needs]

    def reserve(self, request_lists: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]]):
        """Plan the shapes of several loglikelihood calls to come (a suite's tasks) as one,
        so that they share compiled programs, and start compiling them now."""
        needs = []
        for requests in request_lists:
            needs += self._needs(self._group_batches(requests)[1])
        known = [k[1:] for k in self._compiled]
        fitted = fit_shapes(needs, known, compile_cost=self._compile_tokens())
        self._planned.update(zip(needs, fitted, strict=True))
        for shape in dict.fromkeys(fitted):
            self._compile_ahead(("score", *shape))

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum log P(cont | ctx), is_greedy) for each (context ids, continuation ids)."""
        results, batches = self._group_batches(requests)
        shapes = self._shapes(batches)
        for shape in dict.fromkeys(shapes):  # every shape this call needs, compiling at once
            self._compile_ahead(("score", *shape))
        batches = [(b, self._arrays(b, s)) for b, s in zip(batches, shapes, strict=True)]
        pending = []
        for batch, (key, arrays) in batches:
            pending.append((batch, self._dispatch(key, arrays)))
            throttle([out for _, out in pending])
        for batch, (lp, hit) in pending:
            lp, hit = fetch(lp).astype(np.float64), fetch(hit)
            start = 0
            for gr in batch:
                for i, c in gr.conts:
                    end = start + len(c)
                    results[i] = (float(lp[start:end].sum()), bool(hit[start:end].all()))
                    start = end
        return results  # type: ignore[return-value]

    def _arrays(self, batch: list[_Group], shape: tuple[int, int, int]):
        """The batch's shape key and host arrays (ctx, pad, chunk, seg, pos, src, tok,
        blocks) for make_score_fn, padded to shape (rows, context, chunk)."""
        g, p, t = shape
        ctx = np.zeros((g, p), np.int32)
        pad = np.full((g,), p - 1, np.int32)  # padding groups: one (masked-in) token
        chunk = np.zeros((g, t), np.int32)
        seg = np.full((g, t), -1, np.int32)
        pos = np.zeros((g, t), np.int32)
        src, tok = [], []  # per target token, in request order
        for j, gr in enumerate(batch):
            ctx[j, p - len(gr.ctx) :] = gr.ctx
            pad[j] = p - len(gr.ctx)
            at = 0
            for k, (_, c) in enumerate(gr.conts):
                m = len(c) - 1  # inputs: all but the last token
                chunk[j, at : at + m] = c[:-1]
                seg[j, at : at + m] = k
                pos[j, at : at + m] = len(gr.ctx) + np.arange(m)
                src.append(j)
                src.extend(range(g + j * t + at, g + j * t + at + m))
                tok.extend(c)
                at += m
        n = self._n_scored(g, t)
        src_n = np.zeros((n,), np.int32)  # padding entries score position 0, discarded
        src_n[: len(src)] = src
        tok_n = np.zeros((n,), np.int32)
        tok_n[: len(tok)] = tok
        blocks = np.int32(-(-len(src) // HEAD_BLOCK))
        return ("score", g, p, t), (ctx, pad, chunk, seg, pos, src_n, tok_n, blocks)

    def _compile_ahead(self, key: tuple) -> None:
        """Start compiling the scoring program for key's shapes on a worker thread (XLA
        compiles without the GIL): a task's few shapes compile side by side, and while
        the first batches are scored, instead of one after another as each is first met
        (on a first run, without the persistent cache, compiling is most of a small
        task's time)."""
        if key in self._compiled:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.compile_threads, thread_name_prefix="compile")
        from gptjax.sharding import batch_sharding

        def spec(*shape):
            sh = None if self.mesh is None or not shape else batch_sharding(self.mesh, len(shape))
            return jax.ShapeDtypeStruct(shape, np.int32, sharding=sh)

        _, g, p, t = key
        n = self._n_scored(g, t)
        abstract = [spec(g, p), spec(g), spec(g, t), spec(g, t), spec(g, t), spec(n), spec(n)]
        abstract.append(spec())  # blocks

        def compile_():
            start = time.perf_counter()
            out = self._score.lower(self.params, self._head, *abstract).compile()
            self._compile_seconds.append(time.perf_counter() - start)
            return out

        self._compiled[key] = self._pool.submit(lambda: self._call(compile_))
        self.shapes.add(key)

    def _n_scored(self, g: int, t: int) -> int:
        """Scored entries of a (g, ., t) batch: at most a chunk's tokens per row plus one
        per continuation (at most batch_size); a function of the shape, so no shape of
        its own. The LM head skips the blocks beyond the real ones."""
        step = math.lcm(HEAD_BLOCK, self.shards)
        return -(-(g * t + self.batch_size) // step) * step

    def _compile_tokens(self) -> float:
        """What compiling one more shape costs, in padded tokens of scoring: the mean
        compile so far (1 s before the first) times the tokens a second the devices
        score at half their peak FLOP/s (0, no merging for cost, without a peak). Both
        are measured per process; with several, process 0's figure is used by all."""
        if self._token_rate is None:
            from gptjax import metrics, model

            peak = metrics.peak_flops_total() if self.compile_cost else None
            flops = 2 * model.non_embedding_params(self.cfg)
            self._token_rate = 0.5 * peak / flops if peak else 0.0
        seconds = self._compile_seconds or [1.0]
        tokens = self.compile_cost * self._token_rate * sum(seconds) / len(seconds)
        if jax.process_count() > 1:  # every process must plan the same shapes: process 0's
            from jax.experimental import multihost_utils

            tokens = float(multihost_utils.broadcast_one_to_all(np.float64(tokens)))
        return tokens

    def _dispatch(self, key: tuple, arrays):
        *host, blocks = arrays
        args = self._place(*host)
        return self._compiled[key].result()(self.params, self._head, *args, blocks)

    def rolling(self, texts_ids: Sequence[Sequence[int]], prefix_id: int) -> list[float]:
        """Total loglikelihood of each token list over disjoint n_ctx windows."""
        windows, owner = [], []
        for i, ids in enumerate(texts_ids):
            for w in rolling_windows(ids, prefix_id, self.n_ctx):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts_ids)
        for i, (ll, _) in zip(owner, self.loglikelihood(windows), strict=True):
            totals[i] += ll
        return totals

    def greedy(
        self,
        prompts: Sequence[Sequence[int]],
        max_new: int,
        stop_ids: tuple[int, ...],
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Continuations up to and including their first stop id: greedy, or beam search
        with num_beams > 1 (gptjax.beam). Prompts are sorted by length and batched
        (batch_size // num_beams prompts a batch, each prefilled once), bucketed."""
        from gptjax.generate import Sampling, jitted_generate_fn

        max_new = min(max_new, self.n_ctx - 1)
        room = self.n_ctx - max_new
        sampling = Sampling(
            temperature=0.0, max_new_tokens=max_new, stop_ids=stop_ids, num_beams=num_beams,
            length_penalty=length_penalty,
        )  # fmt: skip
        fn = jitted_generate_fn(self.graphdef, self.cfg, sampling)
        prompts = [list(p)[-room:] or [stop_ids[0] if stop_ids else 0] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        pending = []
        per_batch = max(1, self.batch_size // num_beams)
        for s in range(0, len(order), per_batch):
            idx = order[s : s + per_batch]
            b = row_bucket(len(idx), self.shards)
            p = min(length_bucket(max(len(prompts[i]) for i in idx)), room)
            tokens = np.zeros((b, p), np.int32)
            pad = np.full((b,), p - 1, np.int32)
            for j, i in enumerate(idx):
                tokens[j, p - len(prompts[i]) :] = prompts[i]
                pad[j] = p - len(prompts[i])
            self.shapes.add(("generate", b, p, max_new, num_beams))
            tokens_d, pad_d = self._place(tokens, pad)
            pending.append((idx, self._call(fn, self.params, tokens_d, pad_d, jax.random.key(0))))
            throttle([out for _, out in pending])
        for idx, (new, lengths) in pending:
            new, lengths = fetch(new), fetch(lengths)
            for j, i in enumerate(idx):
                out[i] = [int(x) for x in new[j, : lengths[j]]]
        return out


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class EvalModel:
    """A checkpoint's model, tokenizer and scorer: text-level requests."""

    cfg: ModelConfig
    tokenizer: object
    scorer: Scorer
    # encode_pair's results: the few-shot builder and the scorer tokenise each request,
    # and training's evaluation asks for the same ones at every eval step.
    _pairs: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_params(cls, cfg, params, tokenizer, *, mesh=None, batch_size=32, **kw) -> EvalModel:
        from gptjax import model as model_lib

        graphdef, _ = model_lib.abstract_model(cfg)
        return cls(
            cfg, tokenizer, Scorer(graphdef, params, cfg, mesh=mesh, batch_size=batch_size, **kw)
        )

    @classmethod
    def load(
        cls, checkpoint, *, mesh=None, batch_size: int = 32, dtype: str | None = None, **kw
    ) -> EvalModel:
        """Parameters are read straight onto their mesh shardings (no unsharded copy),
        as for generation (gptjax.generate.load), in `dtype`, the dtype scoring runs in
        (default: the checkpoint's compute dtype)."""
        from gptjax.generate import load, read_checkpoint_info

        cfg, tokenizer = read_checkpoint_info(checkpoint)
        if tokenizer is None:
            raise ValueError(f"{checkpoint} has no tokenizer; evaluation needs one")
        loaded = load(checkpoint, mesh, (cfg, tokenizer), dtype or cfg.compute_dtype)
        return cls.from_params(
            loaded.cfg, loaded.params, loaded.tokenizer, mesh=mesh, batch_size=batch_size, **kw
        )

    @property
    def n_ctx(self) -> int:
        return self.cfg.seq_len

    def encode_pair(self, context: str, continuation: str):
        key = (context, continuation)
        if key not in self._pairs:
            self._pairs[key] = encode_pair(self.tokenizer, context, continuation)
        return self._pairs[key]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool, int]]:
        """(loglikelihood, is_greedy, continuation tokens) of each (context, continuation)."""
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        scored = self.scorer.loglikelihood(encoded)
        return [(ll, g, len(e[1])) for (ll, g), e in zip(scored, encoded, strict=True)]

    def reserve(self, pair_lists=(), text_lists=()) -> None:
        """Plan (and start compiling) the shapes of the loglikelihood and rolling calls to
        come: lists of (context, continuation) pairs, lists of texts."""
        requests = [[self.encode_pair(c, x) for c, x in pairs] for pairs in pair_lists]
        eos = self.tokenizer.eos_id
        for texts in text_lists:
            ids = [self.tokenizer.encode(t) for t in texts]
            requests.append([w for i in ids for w in rolling_windows(i, eos, self.n_ctx)])
        self.scorer.reserve(requests)

    def rolling(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(loglikelihood, tokens) of each whole text."""
        ids = [self.tokenizer.encode(t) for t in texts]
        lls = self.scorer.rolling(ids, self.tokenizer.eos_id)
        return [(ll, len(i)) for ll, i in zip(lls, ids, strict=True)]

    def generate(
        self,
        contexts: Sequence[str],
        until: Sequence[str],
        max_new: int,
        num_beams: int = 1,
        length_penalty: float = 1.0,
    ) -> list[str]:
        """Continuation text of each context (greedy, or beam search with num_beams > 1),
        cut at the first stop sequence. Rows stop on device at EOS or at any token whose
        text holds a stop sequence (eval.generation.stop_token_ids)."""
        from gptjax.eval.generation import stop_token_ids
        from gptjax.generate import cut_at_stop

        prompts = [self.tokenizer.encode(c) or [self.tokenizer.eos_id] for c in contexts]
        stop_ids = stop_token_ids(self.tokenizer, tuple(until), self.cfg.vocab_size)
        new = self.scorer.greedy(prompts, max_new, stop_ids, num_beams, length_penalty)
        eos = self.tokenizer.eos_id
        # A stop token's own text is kept up to the stop sequence (" Mr." for "."), EOS's not.
        return [
            cut_at_stop(self.tokenizer.decode(n[:-1] if n and n[-1] == eos else n), list(until))
            for n in new
        ]

    def request_tokens(self, context: str, continuation: str) -> int:
        ctx, cont = self.encode_pair(context, continuation)
        return len(ctx) + len(cont) - 1
