"""Scoring requests on the model: packed, batched, jitted, sharded.

Request kinds, all on token ids:
  loglikelihood  sum log P(continuation | context) and whether greedy decoding would
                 produce it (lm-eval's (logprob, is_greedy)).
  rolling        loglikelihood of a whole text over disjoint windows of n_ctx tokens, as
                 lm-eval's loglikelihood_rolling (first window conditioned on EOS).
  greedy         generation until EOS or max_new tokens (text stop sequences are cut on
                 the host), via gptjax.generate's cached decode loop.

Requests are packed into rows of n_ctx tokens, so that almost no work is padding and a
whole suite runs at one or two compiled shapes. Requests with the same context tokens
(the options of a multiple-choice question) form a group: its context is written once
and each continuation follows it as a branch that attends to the context and to itself
only (attention.tree_mask), at the positions it would have alone; a continuation's last
token is never an input. For HellaSwag that is 1 context + 4 endings of work per
question instead of lm-eval's 4 x (context + ending). Groups are packed best-fit into
rows (`pack_rows`), each a document the others in its row never see; the LM head runs
on the scored positions only.

A batch is `batch_size` rows; its shape (rows, n_ctx) is a row bucket (powers of two,
a multiple of the batch shards), padded onto fewer shapes where that costs less than
compiling (gptjax.eval.buckets.fit_shapes), planned for a whole suite at once
(`reserve`) and compiled on worker threads ahead of use. Padding never changes a number:
padding tokens are documents of their own and padded rows are discarded.

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
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig
from gptjax.eval.buckets import fit_shapes, length_bucket, row_bucket
from gptjax.eval.score_program import (
    HEAD_BLOCK,
    input_shapes,
    make_score_fn,
    scoring_head,
    vocab_chunks,
)
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
        """Input tokens of its continuations: all but their last tokens."""
        return sum(len(c) - 1 for _, c in self.conts)

    @property
    def size(self) -> int:
        """Room it takes in a row: its tokens (context, then continuations) and its
        targets (a row scores at most as many as it has tokens)."""
        return max(len(self.ctx), len(self.conts)) + self.chunk_len


def pack_rows(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of `sizes` (each <= capacity) in rows of at most
    `capacity` in total, each placed in the fullest row it fits in. Deterministic (ties
    by index); rows come out fullest first."""
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - sizes[i], len(rows) - 1))
            continue
        room, r = free.pop(at)
        rows[r].append(i)
        bisect.insort(free, (room - sizes[i], r))
    return rows


class Scorer:
    """Jitted scoring of token-level requests for one model (and mesh), packed in rows."""

    def __init__(
        self,
        graphdef,
        params,
        cfg: ModelConfig,
        *,
        mesh=None,
        batch_size: int = 32,
        compile_threads: int = 2,
        compile_cost: float = 1.0,
    ):
        self.graphdef, self.params, self.cfg, self.mesh = graphdef, params, cfg, mesh
        self.batch_size = max(1, batch_size)
        self.shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self._score = jax.jit(make_score_fn(graphdef, cfg))
        tensor = 1 if mesh is None else mesh.shape["tensor"]
        head_fn = partial(scoring_head, cfg=cfg, n_chunks=vocab_chunks(cfg.padded_vocab, tensor))
        self._head_fn = jax.jit(head_fn)
        self.set_params(params)
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

    @property
    def shapes(self) -> set[tuple]:
        """The distinct scoring programs compiled (or compiling), for the record."""
        return set(self._compiled)

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

    def batches(self, requests):
        """Requests -> (results with the empty continuations filled in, batches: lists of
        rows, each a list of groups packed into n_ctx tokens)."""
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
        # A group is split (its context repeated in each part) into parts that fit a row;
        # one request always fits (truncate).
        groups = []
        for gr in by_ctx.values():
            part = _Group(gr.ctx, [])
            for i, c in gr.conts:
                if part.conts and _Group(gr.ctx, [*part.conts, (i, c)]).size > self.n_ctx:
                    groups.append(part)
                    part = _Group(gr.ctx, [])
                part.conts.append((i, c))
            groups.append(part)
        rows = [[groups[i] for i in row] for row in pack_rows([g.size for g in groups], self.n_ctx)]
        step = self.batch_size
        return results, [rows[s : s + step] for s in range(0, len(rows), step)]

    def _needs(self, batches) -> list[tuple[int, int]]:
        """The smallest (rows, row length) shape that holds each batch."""
        return [(row_bucket(len(b), self.shards), self.n_ctx) for b in batches]

    def _shapes(self, batches) -> list[tuple[int, int]]:
        """The (rows, row length) shape each batch runs at: planned by reserve, or
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
            needs += self._needs(self.batches(requests)[1])
        known = [k[1:] for k in self._compiled]
        fitted = fit_shapes(needs, known, compile_cost=self._compile_tokens())
        self._planned.update(zip(needs, fitted, strict=True))
        for shape in dict.fromkeys(fitted):
            self._compile_ahead(("score", *shape))

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum log P(cont | ctx), is_greedy) for each (context ids, continuation ids)."""
        results, batches = self.batches(requests)
        shapes = self._shapes(batches)
        for shape in dict.fromkeys(shapes):  # every shape this call needs, compiling at once
            self._compile_ahead(("score", *shape))
        pending = []
        for batch, shape in zip(batches, shapes, strict=True):
            key, arrays, owners = self._arrays(batch, shape)
            pending.append((owners, self._dispatch(key, arrays)))
            throttle([out for _, out in pending])
        for owners, (lp, hit) in pending:
            lp, hit = fetch(lp).astype(np.float64), fetch(hit)
            for i, start, end in owners:
                results[i] = (float(lp[start:end].sum()), bool(hit[start:end].all()))
        return results  # type: ignore[return-value]

    def _arrays(self, batch: list[list[_Group]], shape: tuple[int, int]):
        """The batch's shape key, host arrays (tokens, positions, doc, seg, src, tok,
        blocks) for make_score_fn padded to shape (rows, row length), and where each
        request's targets are: (request index, first, end) entries of src."""
        r, s = shape
        tokens = np.zeros((r, s), np.int32)
        pos = np.zeros((r, s), np.int32)
        doc = np.full((r, s), -1, np.int32)
        seg = np.zeros((r, s), np.int32)
        src, tok, owners = [], [], []  # per target token
        for j, row in enumerate(batch):
            at = 0
            for d, gr in enumerate(row):
                n = len(gr.ctx)
                tokens[j, at : at + n] = gr.ctx
                pos[j, at : at + n] = np.arange(n)
                doc[j, at : at + n + gr.chunk_len] = d
                last, at = j * s + at + n - 1, at + n  # the context's last token
                for k, (i, c) in enumerate(gr.conts):
                    m = len(c) - 1  # inputs: all but the last token
                    tokens[j, at : at + m] = c[:-1]
                    pos[j, at : at + m] = n + np.arange(m)
                    seg[j, at : at + m] = k + 1
                    owners.append((i, len(src), len(src) + len(c)))
                    src.append(last)
                    src.extend(range(j * s + at, j * s + at + m))
                    tok.extend(c)
                    at += m
        (n,) = input_shapes(r, s, self.shards)[4]  # the LM head skips blocks beyond src's
        src_n = np.zeros((n,), np.int32)  # padding entries score position 0, discarded
        src_n[: len(src)] = src
        tok_n = np.zeros((n,), np.int32)
        tok_n[: len(tok)] = tok
        blocks = np.int32(-(-len(src) // HEAD_BLOCK))
        return ("score", r, s), (tokens, pos, doc, seg, src_n, tok_n, blocks), owners

    def _compile_ahead(self, key: tuple) -> None:
        """Start compiling the scoring program for key's shapes on a worker thread (XLA
        compiles without the GIL): a suite's few shapes compile side by side, and while
        the data of the first task is read and its first batches are scored."""
        if key in self._compiled:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.compile_threads, thread_name_prefix="compile")
        from gptjax.sharding import batch_sharding

        def spec(*shape):
            sh = None if self.mesh is None or not shape else batch_sharding(self.mesh, len(shape))
            return jax.ShapeDtypeStruct(shape, np.int32, sharding=sh)

        abstract = [spec(*shape) for shape in input_shapes(*key[1:], self.shards)]

        def compile_():
            start = time.perf_counter()
            out = self._score.lower(self.params, self._head, *abstract).compile()
            self._compile_seconds.append(time.perf_counter() - start)
            return out

        self._compiled[key] = self._pool.submit(lambda: self._call(compile_))

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
