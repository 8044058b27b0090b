"""Text generation for decoders: pruned prefill, then decoding on the reduced KV caches.

One compiled program per (batch size, prompt length, schedule, max_new_tokens, sampling
kind) does the whole thing under ``jax.jit``: the prefill (``GPT2LMHeadModel.prefill``, with
ACC elimination when the schedule drops rows) and a ``lax.while_loop`` of single-token
``extend`` steps on caches of static size ``keep_l + max_new_tokens``::

    gen = Generator.from_loaded(convert.load("/path/to/gpt2", "lm"))
    out = gen.generate(input_ids, attention_mask, max_new_tokens=32, speedup=2.0)
    out.tokens          # [B, 32] numpy; after an eos every token is the pad id

Prompts are right-padded ([B, T] plus a mask); each row continues from its own last real
token, with position ids counting on from its real length. Sampling: ``sample_logits``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from accjax import inference, models, programs
from accjax import schedule as sched_lib

Array = jax.Array


def sample_logits(logits: Array, rng: Array, *, greedy: bool, temperature: Array | float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> Array:
    """Next tokens [B] int32 from logits [B, V] (every family's decoding).

    Args:
      greedy: argmax (static); otherwise categorical sampling.
      temperature: divides the logits (traced: changing it does not recompile).
      top_k: static; > 0 keeps only the k most likely tokens before sampling.
      top_p: static; < 1 keeps the smallest set of most likely tokens whose probability
        reaches top_p (nucleus sampling; the best token always stays).
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] k-th largest
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if 0.0 < top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        cutoff = jnp.take_along_axis(srt, jnp.sum(cum < top_p, axis=-1, keepdims=True), axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def token_log_probs(logits: Array, labels: Array) -> Array:
    """log p(labels) per position: logits [B, T, V], labels [B, T] (negatives -> 0) -> [B, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]


def decoding(m: int):
    """The condition of a decoding ``while_loop`` whose state is (step, _, _, done [B], ...):
    fewer than ``m`` steps and a row not done yet."""
    return lambda state: (state[0] < m) & ~jnp.all(state[3])


def decoding_rows(batch: int, plan: sched_lib.Plan, max_new_tokens: int) -> float:
    """The rows a generation program's GEMMs are chosen by (``programs.compiler_options``): its
    decoding steps' (``batch``), which take most of its time, or the prefill's (batch x length /
    analytic) when it decodes nothing. On an H100 (bf16, prompts of 128 and 512, 33 and 65
    tokens) XLA's Triton GEMMs ran generation as fast as cuBLAS at one sequence and faster from
    8 up, prefill or encoder included: GPT-2 13-19% (batches 8-32), Flan-T5-base 9-12% (8 and 16,
    dense and 4x; docs/benchmarks.md, twenty-sixth and twenty-seventh sessions). ``Generator``
    and ``seq2seq.Seq2SeqPredictor`` both use it."""
    if max_new_tokens > 1:
        return programs.DecodingRows(batch)  # (``programs.TRITON_GEMM_MAX_DECODE_ROWS``)
    return batch * plan.length / plan.analytic


@dataclasses.dataclass
class GenerateOutput:
    """tokens [B, M] (pad after eos), lengths [B] tokens before and including the first eos,
    first_logits [B, V] float32 (the prefill's prediction), cache (the final KV cache)."""

    tokens: np.ndarray
    lengths: np.ndarray
    first_logits: np.ndarray
    cache: Any


def generate_fn(module, *, schedule: tuple[int, ...] | None, max_new_tokens: int, greedy: bool,
                top_k: int = 0, eos_token_id: int | None = None, pad_token_id: int = 0,
                acc_variant: str = "plain"):
    """A pure function (params, input_ids, attention_mask, rng, temperature) -> outputs dict.

    ``module`` is a decoder LM with ``prefill`` and ``extend`` methods (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``); every other argument is static (part of the program).
    """
    m = int(max_new_tokens)
    if m < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def run(params, input_ids, attention_mask, rng, temperature):
        v = {"params": params}
        logits, cache, _ = module.apply(v, input_ids, attention_mask, max_new_tokens=m,
                                        schedule=schedule, acc_variant=acc_variant,
                                        method="prefill")
        b = input_ids.shape[0]
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits, sub, greedy=greedy, temperature=temperature, top_k=top_k)
        done = (tok == eos_token_id) if eos_token_id is not None else jnp.zeros((b,), bool)
        tokens = jnp.full((b, m), pad_token_id, jnp.int32).at[:, 0].set(tok)
        lengths = jnp.ones((b,), jnp.int32)

        def body(state):
            i, tokens, lengths, done, cache, rng = state
            prev = lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # [B, 1]
            step_logits, cache = module.apply(v, prev, cache, method="extend")  # [B, 1, V]
            rng, sub = jax.random.split(rng)
            nxt = sample_logits(step_logits[:, 0], sub, greedy=greedy, temperature=temperature,
                                top_k=top_k)
            nxt = jnp.where(done, pad_token_id, nxt)
            lengths = lengths + (~done).astype(jnp.int32)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            tokens = lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], i, axis=1)
            return i + 1, tokens, lengths, done, cache, rng

        state = (jnp.ones((), jnp.int32), tokens, lengths, done, cache, rng)
        _, tokens, lengths, done, cache, _ = lax.while_loop(decoding(m), body, state)
        return {"tokens": tokens, "lengths": lengths, "first_logits": logits, "cache": cache}

    return run


# The LM head's table is padded once to a multiple of this many vocabulary rows where the
# family can (``Family.pad_vocab``: GPT-2's 50257), so that XLA does not pad it inside every
# prefill for cuBLAS (0: as stored). H100, GPT-2 8 x 1024 prefill, same process: 1.2% faster
# dense, 1.5-2.3% at 2-3.72x, logits identical (docs/benchmarks.md, thirty-first session).
VOCAB_MULTIPLE = 128


class LMPredictor(inference.Planned):
    """A predictor of an 'lm' head model (decoders, T5), made from ``convert.load(spec, 'lm')``:
    parameters cast once to ``param_dtype`` (and the LM head's table padded, ``VOCAB_MULTIPLE``:
    ``module``'s config then says so); ``bucket``, ``floor`` and ``prune_every`` as
    ``schedule.plan`` takes them; ``acc_variant``: how rows are ranked."""

    def __init__(self, module, params, config, *, param_dtype: str | None = None, bucket: int = 8,
                 floor: int = 1, acc_variant: str = "plain", prune_every: int = 1):
        pad = models.get_family(config.family).pad_vocab
        if pad is not None and VOCAB_MULTIPLE:
            module_config, params = pad(module.config, params, VOCAB_MULTIPLE)
            module = module.clone(config=module_config)
        self.module, self.config = module, config
        self.params = inference.cast_params(params, param_dtype)
        self.bucket, self.floor, self.acc_variant = bucket, floor, acc_variant
        self.prune_every = sched_lib.check_every(prune_every)
        self.cost = models.cost_model(config, "lm")
        self.programs = programs.ProgramCache()

    def _compiled(self, key: tuple, fn, *specs, rows: float | None = None):
        """``fn(params, *args)`` compiled once for ``key``, traced with ``specs``; ``rows``: its
        GEMMs' rows on average, when known (``programs.compiler_options``)."""
        return self.programs.get(key, lambda: jax.jit(self.programs.counted(fn)).lower(self.params, *specs),
                                 rows=rows)

    @classmethod
    def from_loaded(cls, loaded, **kw):
        if loaded.head != "lm":
            raise ValueError(f"{cls.__name__} needs an LM head; {loaded.folder} was loaded with head "
                             f"{loaded.head!r} (load it with head='lm')")
        return cls(loaded.module, loaded.params, loaded.config, **kw)


class Generator(LMPredictor):
    """Compiled-once generation at any speedup for a decoder LM (GPT-2, Llama); arguments as
    ``LMPredictor``."""

    def program(self, batch: int, plan: sched_lib.Plan, max_new_tokens: int, greedy: bool,
                top_k: int, eos_token_id: int | None, pad_token_id: int):
        fn = generate_fn(self.module, schedule=plan.schedule, max_new_tokens=max_new_tokens,
                         greedy=greedy, top_k=top_k, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, acc_variant=self.acc_variant)
        spec = jax.ShapeDtypeStruct((batch, plan.length), jnp.int32)
        key = (batch, plan.length, plan.schedule, max_new_tokens, greedy, top_k, eos_token_id, pad_token_id)
        rows = programs.gemm_rows(getattr(self.config, "dtype", "float32"),
                                  decoding_rows(batch, plan, max_new_tokens))
        return self._compiled(key, fn, spec, spec, jax.random.PRNGKey(0), jnp.float32(1.0), rows=rows)

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
                 speedup: float = 1.0, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, eos_token_id: int | None = -1, pad_token_id: int | None = None
                 ) -> GenerateOutput:
        """Generates ``max_new_tokens`` tokens after each right-padded prompt.

        Args:
          input_ids, attention_mask: [B, T] right-padded prompts (mask default: all real).
          speedup: prefill speedup (a number >= 1; ``schedule.plan`` turns it into keep-lengths).
          temperature: 0 = greedy; > 0 samples.
          top_k: restrict sampling to the k most likely tokens (0 = all).
          eos_token_id: stop a row after this token (-1: the config's eos; None: never stop).
          pad_token_id: what fills a row after it stopped (default: the eos id).
        """
        ids = np.asarray(input_ids, np.int32)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if not np.all(mask.sum(1) >= 1):
            raise ValueError("every prompt needs at least one real token")
        if np.any(np.diff(mask, axis=1) > 0):
            raise ValueError("prompts must be right-padded (real tokens first, then padding)")
        b, t = ids.shape
        longest = int(mask.sum(1).max()) + max_new_tokens
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt ({int(mask.sum(1).max())} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's {self.config.max_position_embeddings} positions")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if eos_token_id == -1:
            eos_token_id = self.config.eos_token_id
        pad = pad_token_id if pad_token_id is not None else (
            eos_token_id if eos_token_id is not None else self.config.eos_token_id)
        greedy = temperature == 0 or top_k == 1
        prog = self.program(b, self.plan(t, speedup), int(max_new_tokens), greedy, int(top_k),
                            eos_token_id, int(pad))
        out = prog(self.params, ids, mask, jax.random.PRNGKey(seed),
                   jnp.float32(temperature if temperature > 0 else 1.0))
        return GenerateOutput(tokens=np.asarray(out["tokens"]), lengths=np.asarray(out["lengths"]),
                              first_logits=np.asarray(out["first_logits"]), cache=out["cache"])
