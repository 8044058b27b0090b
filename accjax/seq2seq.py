"""Encoder-decoder programs: generation, candidate scoring and the seq2seq loss, at any speedup.

Everything here is a pure function of (module, params, arrays) with static shapes, so it
runs under ``jax.jit``; ``Seq2SeqPredictor`` compiles each program once per
(batch size, length bucket, schedule, ...) key and keeps it::

    pred = Seq2SeqPredictor.from_loaded(convert.load("/path/to/flan-t5-base", "lm"))
    tokens = pred.generate(batch, speedup=2.0, max_new_tokens=32)        # [B, 32] numpy
    scores = pred.score(batch, candidates, speedup=2.0)                  # [B, C] log-probs

Elimination happens in the encoder (``T5ForConditionalGeneration.encode``); the decoder sees
only the kept rows, whose cross-attention keys and values generation computes once, then one
cached decoder step per token in a ``lax.while_loop`` until every row has emitted EOS (then
pad, as HF does) or ``max_new_tokens``.

Decoding modes: ``greedy`` (argmax; equals HF ``generate(do_sample=False, num_beams=1)``)
and ``sample`` (temperature, then optional top-k and nucleus top-p filtering). Beam search
is not implemented. ``seq2seq_loss`` matches HF ``T5ForConditionalGeneration(labels=...).loss``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from accjax import generate, inference, programs
from accjax import schedule as sched_lib
from accjax.models import t5 as t5_lib

Array = jax.Array

MODES = ("greedy", "sample")


# ----------------------------------------------------------------------------- programs
def _encode(module, params, input_ids, attention_mask, schedule, acc_variant, protect_last):
    dense = schedule is None or all(k >= input_ids.shape[1] for k in schedule)
    return module.apply({"params": params}, input_ids, attention_mask,
                        schedule=None if dense else tuple(schedule), acc_variant=acc_variant,
                        protect_last=protect_last, method="encode")


def generate_tokens(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    rng: Array | None = None,
    *,
    schedule: tuple[int, ...] | None = None,
    max_new_tokens: int = 32,
    mode: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    acc_variant: str = "plain",
    protect_last: bool = False,
) -> Array:
    """[B, max_new_tokens] int32 tokens generated after [B, T] encoder inputs (a
    ``T5ForConditionalGeneration``'s), pad after each row's EOS; ``schedule``: static encoder
    keep-lengths (None = dense); ``rng``: needed by ``mode='sample'``. Traceable under jit."""
    if mode not in MODES:
        raise ValueError(f"unknown decoding mode {mode!r}; choose one of {MODES}")
    if mode == "sample" and rng is None:
        raise ValueError("mode='sample' needs an rng key")
    cfg, b, m = module.config, input_ids.shape[0], int(max_new_tokens)
    enc = _encode(module, params, input_ids, attention_mask, schedule, acc_variant, protect_last)
    enc_mask = enc.rows.mask  # [B, K] the cross-attention mask of the kept rows
    kv = t5_lib.cross_kv(module, params, enc.last_hidden_state)
    cache = t5_lib.init_cache(cfg, b, m)
    out = jnp.full((b, m), cfg.pad_token_id, jnp.int32)
    tok = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    key = rng if rng is not None else jax.random.PRNGKey(0)

    def body(state):
        i, tok, cache, done, out, key = state
        logits, cache = module.apply({"params": params}, tok, i, cache, kv, enc_mask,
                                     method="decode_step")  # [B, V]
        key, sub = jax.random.split(key)
        nxt = generate.sample_logits(logits, sub, greedy=mode == "greedy", temperature=max(temperature, 1e-6),
                                     top_k=top_k, top_p=top_p)
        nxt = jnp.where(done, cfg.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        done = done | (nxt == cfg.eos_token_id)
        return i + 1, nxt, cache, done, out, key

    state = (jnp.int32(0), tok, cache, done, out, key)
    return jax.lax.while_loop(generate.decoding(m), body, state)[4]


def first_token(module, params, input_ids: Array, attention_mask: Array, *,
                schedule: tuple[int, ...] | None = None, acc_variant: str = "plain",
                protect_last: bool = False) -> Array:
    """Encoder + cross-attention K/V + the first decoder step: the first token [B] int32.

    What "time to first token" measures; the latency the encoder elimination reduces.
    """
    cfg = module.config
    b = input_ids.shape[0]
    enc = _encode(module, params, input_ids, attention_mask, schedule, acc_variant, protect_last)
    kv = t5_lib.cross_kv(module, params, enc.last_hidden_state)
    tok = jnp.full((b,), cfg.decoder_start_token_id, jnp.int32)
    logits, _ = module.apply({"params": params}, tok, jnp.int32(0), t5_lib.init_cache(cfg, b, 1), kv,
                             enc.rows.mask, params.get(t5_lib.PACKED_SELF_VO), method="decode_step")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def score_candidates(
    module,
    params,
    input_ids: Array,
    attention_mask: Array,
    cand_ids: Array,
    cand_mask: Array,
    *,
    schedule: tuple[int, ...] | None = None,
    acc_variant: str = "plain",
    protect_last: bool = False,
) -> Array:
    """[B, C] float32 log-likelihood of every candidate target (``cand_ids`` [C, L], e.g. a label
    word and its EOS, right-padded; ``cand_mask`` [C, L] 1 on the tokens that count) given
    every [B, T] prompt: the encoder runs once per prompt (with elimination), each candidate
    is decoded, teacher forced, against the kept encoder rows (rank classification)."""
    cfg = module.config
    b, c = input_ids.shape[0], cand_ids.shape[0]
    enc = _encode(module, params, input_ids, attention_mask, schedule, acc_variant, protect_last)
    h = jnp.repeat(enc.last_hidden_state, c, axis=0)  # [B*C, K, D], example-major
    m = jnp.repeat(enc.rows.mask, c, axis=0)  # [B*C, K]
    labels = jnp.tile(cand_ids, (b, 1))  # [B*C, L]
    lmask = jnp.tile(cand_mask, (b, 1)).astype(jnp.float32)
    dec_in = t5_lib.shift_right(jnp.where(lmask > 0, labels, -100), cfg.decoder_start_token_id,
                                cfg.pad_token_id)
    logits = module.apply({"params": params}, dec_in, h, m, method="decode")  # [B*C, L, V]
    lp = (generate.token_log_probs(logits, labels) * lmask).sum(axis=-1)  # [B*C]
    return lp.reshape(b, c)


# ---------------------------------------------------------------------------------- loss
def seq2seq_loss(
    module,
    params,
    batch: dict[str, Array],
    rng: Array | None = None,
    *,
    schedule: tuple[int, ...] | None = None,
    acc_variant: str = "plain",
    protect_last: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """(mean token cross-entropy, metrics ``loss``, ``token_accuracy``, ``target_tokens``) of a
    text-to-text batch: ``input_ids`` and ``attention_mask`` [B, T], ``labels`` [B, L] (target
    ids ending in EOS; negatives ignored), optional ``decoder_input_ids`` (default: labels
    shifted right). ``rng``: dropout key (None: no dropout); ``label_smoothing``: mass spread
    uniformly over the vocabulary. Differentiable in ``params``."""
    cfg = module.config
    labels = jnp.asarray(batch["labels"])
    dec_in = batch.get("decoder_input_ids")
    if dec_in is None:
        dec_in = t5_lib.shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
    dense = schedule is None or all(k >= batch["input_ids"].shape[1] for k in schedule)
    kw = {} if rng is None else {"rngs": {"dropout": rng}}
    out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], dec_in,
                       schedule=None if dense else tuple(schedule), acc_variant=acc_variant,
                       protect_last=protect_last, deterministic=rng is None, **kw)
    logits = out.logits  # [B, L, V] float32
    valid = (labels >= 0).astype(jnp.float32)
    nll = -generate.token_log_probs(logits, labels)  # [B, L]
    if label_smoothing > 0:
        uniform = -jax.nn.log_softmax(logits, axis=-1).mean(axis=-1)  # [B, L]
        nll = (1 - label_smoothing) * nll + label_smoothing * uniform
    n = jnp.maximum(valid.sum(), 1.0)
    loss = (nll * valid).sum() / n
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * valid
    return loss, {"loss": loss, "token_accuracy": correct.sum() / n, "target_tokens": valid.sum()}


def make_loss_fn(module, *, schedule: tuple[int, ...] | None = None, acc_variant: str = "plain",
                 protect_last: bool = False, label_smoothing: float = 0.0
                 ) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """``loss_fn(params, batch, rng=None) -> (loss, metrics)`` for a trainer, e.g.
    ``jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)``."""
    return functools.partial(seq2seq_loss, module, schedule=schedule, acc_variant=acc_variant,
                             protect_last=protect_last, label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------- serving
def chunk_batch(pred, batch: dict[str, np.ndarray], fill: int | None = None):
    """(n, padded length, [(ids [B, length], mask [B, length])]): ``batch`` right-padded to
    ``pred``'s smallest length bucket holding it and cut into chunks of ``pred.batch_size``
    (filler rows: one token ``fill``, default the first row's first token)."""
    ids = np.asarray(batch["input_ids"])
    n = ids.shape[0]
    if n == 0:
        raise ValueError("empty batch")
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    length, b = pred.length_bucket(int(mask.sum(1).max())), pred.batch_size
    fill = int(ids[0, 0]) if fill is None else fill
    return n, length, [(programs.pad_rows(ids[i:i + b], b, length, fill=fill),
                        programs.pad_rows(mask[i:i + b], b, length, fill=1)) for i in range(0, n, b)]


# Seq2SeqPredictor's params carry the cross-attention K/V kernels packed (``t5.pack_cross_kv``:
# one product instead of a copy and a product each call on a GPU; 2 x L x D x D more weights)
# and the first step's self-attention value and output projections folded (``t5.pack_self_vo``:
# one product instead of two and a slice per layer; L x D x D more).
PACK_CROSS_KV = True
FOLD_SELF_VO = True


class Seq2SeqPredictor(generate.LMPredictor):
    """Compiled-once generation and scoring for a T5 model at any speedup: inputs padded and
    chunked by ``chunk_batch`` (filler rows: one EOS token), the speedup an encoder plan for
    the padded length (``schedule.plan``); arguments as ``LMPredictor``'s."""

    def __init__(self, module, params, config, *, batch_size: int = 16,
                 length_buckets: Sequence[int] = inference.DEFAULT_LENGTH_BUCKETS,
                 acc_variant: str = "plain", protect_last: bool = False, bucket: int = 8,
                 floor: int = 1, param_dtype: str | None = None, prune_every: int = 1):
        super().__init__(module, params, config, param_dtype=param_dtype, bucket=bucket, floor=floor,
                         acc_variant=acc_variant, prune_every=prune_every)
        self.batch_size, self.protect_last = int(batch_size), protect_last
        self.length_buckets = inference.cap_buckets(config, length_buckets)

    @property
    def params(self) -> dict:
        """The params the programs take: the model's, with the decoder's cross-attention K/V
        kernels also packed into one array (``t5.pack_cross_kv``) when ``PACK_CROSS_KV``, and
        the first step's self-attention projections folded (``t5.pack_self_vo``) when
        ``FOLD_SELF_VO``. Assigning new params (a training run's evaluation) packs them again."""
        return self._params

    @params.setter
    def params(self, params: dict) -> None:
        params = t5_lib.pack_cross_kv(params) if PACK_CROSS_KV else params
        self._params = t5_lib.pack_self_vo(params) if FOLD_SELF_VO else params

    def generate_program(self, b: int, plan: sched_lib.Plan, *, max_new_tokens: int,
                         mode: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0):
        spec = jax.ShapeDtypeStruct((b, plan.length), jnp.int32)
        rng_spec = jax.ShapeDtypeStruct((2,), jnp.uint32)
        fn = lambda p, ids, mask, rng: generate_tokens(  # noqa: E731
            self.module, p, ids, mask, rng, schedule=plan.schedule, max_new_tokens=max_new_tokens,
            mode=mode, temperature=temperature, top_k=top_k, top_p=top_p,
            acc_variant=self.acc_variant, protect_last=self.protect_last)
        key = ("generate", b, plan.length, plan.schedule, max_new_tokens, mode, temperature, top_k, top_p)
        rows = programs.gemm_rows(getattr(self.config, "dtype", "float32"),
                                  generate.decoding_rows(b, plan, max_new_tokens))
        return self._compiled(key, fn, spec, spec, rng_spec, rows=rows)

    def score_program(self, b: int, plan: sched_lib.Plan, c: int, width: int):
        spec = jax.ShapeDtypeStruct((b, plan.length), jnp.int32)
        cspec = jax.ShapeDtypeStruct((c, width), jnp.int32)
        fn = lambda p, ids, mask, cids, cmask: score_candidates(  # noqa: E731
            self.module, p, ids, mask, cids, cmask, schedule=plan.schedule,
            acc_variant=self.acc_variant, protect_last=self.protect_last)
        key = ("score", b, plan.length, plan.schedule, c, width)
        return self._compiled(key, fn, spec, spec, cspec, cspec)

    def first_token_program(self, b: int, plan: sched_lib.Plan):
        spec = jax.ShapeDtypeStruct((b, plan.length), jnp.int32)
        fn = lambda p, ids, mask: first_token(  # noqa: E731
            self.module, p, ids, mask, schedule=plan.schedule, acc_variant=self.acc_variant,
            protect_last=self.protect_last)
        return self._compiled(("first_token", b, plan.length, plan.schedule), fn, spec, spec)

    # ------------------------------------------------------------------------- running
    def _chunks(self, batch: dict[str, np.ndarray]):
        return chunk_batch(self, batch, fill=self.config.eos_token_id)

    def generate(self, batch: dict[str, np.ndarray], speedup: float = 1.0, *,
                 max_new_tokens: int = 32, mode: str = "greedy", temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
        """[n, t] inputs -> [n, max_new_tokens] generated ids (pad after EOS)."""
        n, length, chunks = self._chunks(batch)
        prog = self.generate_program(self.batch_size, self.plan(length, speedup),
                                     max_new_tokens=max_new_tokens, mode=mode,
                                     temperature=temperature, top_k=top_k, top_p=top_p)
        key = jax.random.PRNGKey(seed)
        outs = []
        for cid, cm in chunks:
            key, sub = jax.random.split(key)
            outs.append(np.asarray(prog(self.params, cid, cm, sub)))
        return np.concatenate(outs)[:n]

    def score(self, batch: dict[str, np.ndarray], cand_ids: np.ndarray, cand_mask: np.ndarray,
              speedup: float = 1.0) -> np.ndarray:
        """[n, t] prompts, [C, L] candidates -> [n, C] log-likelihoods."""
        n, length, chunks = self._chunks(batch)
        cand_ids, cand_mask = np.asarray(cand_ids, np.int32), np.asarray(cand_mask, np.int32)
        prog = self.score_program(self.batch_size, self.plan(length, speedup), *cand_ids.shape)
        outs = [np.asarray(prog(self.params, cid, cm, cand_ids, cand_mask)) for cid, cm in chunks]
        return np.concatenate(outs)[:n]

    def time_first_token(self, batch_size: int, length: int, speedup: float = 1.0, *,
                         iters: int = 30, warmup: int = 3, seed: int = 0,
                         prune_every: int | None = None, floor: int | None = None) -> dict[str, Any]:
        """Median wall time (ms) of encoder + first token on random full-length inputs."""
        plan = self.plan(length, speedup, prune_every=prune_every, floor=floor)
        prog = self.first_token_program(batch_size, plan)
        ids = programs.random_batches(np.random.default_rng(seed), (batch_size, length),
                                      self.config.vocab_size, low=2)
        batches = [jax.device_put((a, np.ones_like(a))) for a in ids]
        return {**programs.time_calls(lambda b: prog(self.params, *b), batches, iters=iters,
                                      warmup=warmup), "schedule": plan.keep}
