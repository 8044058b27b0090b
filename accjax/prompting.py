"""Instruction data, prompts, and prompting evaluation of T5 models and decoders (GPT-2,
Llama) at several speedups.

Data: JSONL, one ``{"instruction", "input", "target"}`` object a line (``load_jsonl``).

Prompt (``build_prompt``), the same layout with and without exemplars; k exemplars make
k-shot prompting, none zero-shot::

    {instruction}

    {exemplar 1 input}
    Answer: {exemplar 1 target}

    ...
    {input}
    Answer:

Empty parts and their blank lines are left out. Exemplars for example i are k other
examples drawn from the pool (the data itself by default, never example i) with a
generator seeded by (seed, i), so every speedup sees the same prompts. A prompt longer
than ``max_length`` tokens loses exemplars from the front until it fits (counted as
``shots_dropped``); a zero-shot prompt that is still too long is truncated.

Scoring:
  * classification (``labels`` given): rank classification. Each label word, tokenised
    with its EOS, is scored by ``log p(label | prompt)`` = the sum of its token log-probs
    (``seq2seq.score_candidates``); the prediction is the best label. Metric: accuracy.
  * generation (no labels): greedy decoding, then exact match and token F1 after SQuAD
    normalisation (lower case, punctuation and the articles a/an/the removed, whitespace
    collapsed); F1 over the bag of normalised tokens.

Decoders (``DecoderPredictor``) score a label word without EOS, after 'Answer:' with a
leading space, or, with a chat template (``chat_messages``), as the start of the assistant's
answer; free generation keeps the first line of the greedy answer for exact match.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from accjax import data, guards
from accjax import generate, inference, lm, programs, seq2seq, tokenization

ANSWER_PREFIX = "Answer:"


@guards.user_error
class PromptDataError(ValueError):
    """Unusable prompting data; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    target: str


# ------------------------------------------------------------------------------- data
def load_jsonl(path: str | Path) -> list[Example]:
    """Reads ``{"instruction", "input", "target"}`` lines (blank lines skipped); a bad file or
    line is a PromptDataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"data file {path} does not exist")
    out = []
    for n, obj in data.json_lines(path, PromptDataError):
        for k in ("instruction", "input", "target"):
            if k in obj and not isinstance(obj[k], str):
                raise PromptDataError(f"{path}:{n}: field {k!r} must be a string")
        if not obj.get("target", "").strip():
            raise PromptDataError(f"{path}:{n}: missing or empty 'target'")
        out.append(Example(obj.get("instruction", "").strip(), obj.get("input", "").strip(),
                           obj["target"].strip()))
    if not out:
        raise PromptDataError(f"{path} holds no examples (one JSON object per line: "
                              '{"instruction": ..., "input": ..., "target": ...})')
    return out


def build_prompt(example: Example, exemplars: Sequence[Example] = (), *,
                 answer_prefix: str = ANSWER_PREFIX) -> str:
    """The prompt of the module docstring; ``exemplars`` empty = zero-shot."""
    blocks = [example.instruction] if example.instruction else []
    for ex in exemplars:
        blocks.append("\n".join(p for p in (ex.input, f"{answer_prefix} {ex.target}") if p))
    blocks.append("\n".join(p for p in (example.input, answer_prefix) if p))
    return "\n\n".join(blocks)


def choose_exemplars(n_examples: int, index: int, k: int, seed: int, pool_size: int | None = None,
                     ) -> list[int]:
    """k exemplar indices for example ``index``: into the pool if given, else into the data
    (never ``index`` itself); deterministic in (seed, index)."""
    if k <= 0:
        return []
    rng = np.random.default_rng([seed, index])
    if pool_size is not None:
        if pool_size < k:
            raise PromptDataError(f"{k}-shot prompting needs {k} exemplars, the pool has {pool_size}")
        return [int(i) for i in rng.choice(pool_size, size=k, replace=False)]
    if n_examples - 1 < k:
        raise PromptDataError(f"{k}-shot prompting needs {k + 1} examples, the data has {n_examples}")
    pick = rng.choice(n_examples - 1, size=k, replace=False)
    return [int(i) + (i >= index) for i in pick]  # skip example ``index``


def encode_prompts(tokenizer: tokenization.Tokenizer, examples: Sequence[Example], *, shots: int = 0,
                   pool: Sequence[Example] | None = None, seed: int = 0, max_length: int = 512,
                   answer_prefix: str = ANSWER_PREFIX, render=None) -> tuple[list[list[int]], dict[str, int]]:
    """(ids per example, stats {'shots_dropped', 'truncated'}): tokenised prompts (with the
    tokenizer's special tokens), dropping exemplars that do not fit ``max_length``.
    ``render(example, exemplars) -> str`` replaces ``build_prompt`` (``chat_renderer``)."""
    if render is None:
        render = lambda ex, shown: build_prompt(ex, shown, answer_prefix=answer_prefix)  # noqa: E731
    ids, dropped, truncated = [], 0, 0
    for i, ex in enumerate(examples):
        idx = choose_exemplars(len(examples), i, shots, seed, None if pool is None else len(pool))
        src = pool if pool is not None else examples
        shown = [src[j] for j in idx]
        while True:
            enc = tokenizer.encode([render(ex, shown)], max_length=max_length)
            if not enc.truncated or not shown:
                break
            shown = shown[1:]  # the prompt is too long: one exemplar fewer
            dropped += 1
        truncated += enc.truncated
        ids.append(enc.ids[0])
    return ids, {"shots_dropped": dropped, "truncated": truncated}


def label_candidates(tokenizer: tokenization.Tokenizer, labels: Sequence[str], *, prefix: str = "",
                     add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Label words -> candidate targets [C, L] and their mask [C, L].

    T5 (the defaults): each label with its EOS. Decoders: ``prefix + label`` as it continues
    the prompt (``' positive'`` after 'Answer:'; no space at the start of a chat answer),
    without special tokens.
    """
    enc = tokenizer.encode([prefix + w for w in labels], add_special_tokens=add_special_tokens).ids
    unk = tokenizer.token_to_id("<unk>")
    for lab, ids in zip(labels, enc):
        if unk is not None and unk in ids:
            raise PromptDataError(f"label {lab!r} contains tokens unknown to the tokenizer")
    p = tokenization.pad(tokenization.Encoded(enc), max(len(x) for x in enc), 0)
    return p["input_ids"], p["attention_mask"]


def text_to_text_batch(tokenizer: tokenization.Tokenizer, examples: Sequence[Example], *,
                       source_length: int, target_length: int, shots: int = 0, seed: int = 0,
                       batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Fixed-shape training batch: ``input_ids``/``attention_mask`` [B, source_length] from
    the prompts, ``labels`` [B, target_length] (target + EOS, truncated; padding -100).

    ``batch_size`` > len(examples) appends rows with no counted label (all -100)."""
    ids, _ = encode_prompts(tokenizer, examples, shots=shots, seed=seed, max_length=source_length)
    b = batch_size or len(examples)
    src = tokenization.pad(tokenization.Encoded(ids), source_length, tokenizer.pad_id, b)
    tgt = tokenizer.encode([ex.target for ex in examples], max_length=target_length).ids
    labels = np.full((b, target_length), -100, np.int32)
    for i, t in enumerate(tgt):
        labels[i, :len(t)] = t
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}


def render_chat(template: str, messages: Sequence[dict[str, str]], *,
                add_generation_prompt: bool = True, **variables) -> str:
    """A chat model's Jinja template rendered as ``transformers``' ``apply_chat_template``
    renders it (sandboxed; trimmed blocks), e.g. SmolLM2's::

        [{"role": "user", "content": "Hi"}] ->
        <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
        <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages),
                                                add_generation_prompt=add_generation_prompt,
                                                **variables)
    except TemplateError as e:
        raise PromptDataError(f"the model's chat template failed: {e}") from None


# ---------------------------------------------------------------------------- metrics
def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    """F1 of the normalised token bags; 1.0 when both are empty."""
    p, t = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not p or not t:
        return float(p == t)
    common = sum((collections.Counter(p) & collections.Counter(t)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


# -------------------------------------------------------------------------- evaluation
def _label_index(examples: Sequence[Example], labels: Sequence[str]) -> np.ndarray:
    norm = {normalize_answer(word): i for i, word in enumerate(labels)}
    if len(norm) != len(labels):
        raise PromptDataError(f"labels {list(labels)} are not distinct after normalisation")
    for i, ex in enumerate(examples):
        if normalize_answer(ex.target) not in norm:
            raise PromptDataError(f"example {i + 1}: target {ex.target!r} is not one of the labels {list(labels)}")
    return np.array([norm[normalize_answer(ex.target)] for ex in examples])


def _batches(ids: list[list[int]], batch_size: int, pad_id: int):
    """Length-sorted chunks -> (example indices, input_ids [b, t], attention_mask [b, t])."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        p = tokenization.pad(tokenization.Encoded([ids[i] for i in idx]), max(len(ids[i]) for i in idx), pad_id)
        yield idx, p["input_ids"], p["attention_mask"]


def evaluate(predictor, tokenizer: tokenization.Tokenizer, examples: Sequence[Example], *,
             speedups: Sequence[float], shots: Sequence[int] = (0,), labels: Sequence[str] | None = None,
             pool: Sequence[Example] | None = None, max_new_tokens: int = 32, max_length: int = 512,
             seed: int = 0, log=None) -> dict[str, Any]:
    """Scores ``examples`` for every (shots, speedup) pair with a ``seq2seq.Seq2SeqPredictor``
    or a ``DecoderPredictor``: by label likelihood with ``labels``, else by generation;
    exemplars from ``pool`` (default: the examples themselves, leaving each one out). Returns
    {'task', 'labels', 'n', 'rows': [{'shots', 'speedup', 'analytic_speedup', metrics...,
    'shots_dropped', 'truncated', 'seconds'}], 'predictions': {'k-shot@s': [...]}}."""
    task = "classification" if labels else "generation"
    gold = _label_index(examples, labels) if labels else None
    cands = (label_candidates(tokenizer, labels, **getattr(predictor, "label_encoding", {}))
             if labels else None)
    render = getattr(predictor, "render", None)
    rows, predictions = [], {}
    for k in shots:
        ids, stats = encode_prompts(tokenizer, examples, shots=k, pool=pool, seed=seed,
                                    max_length=min(max_length, predictor.length_buckets[-1]),
                                    render=render)
        for s in speedups:
            t0, preds, analytic = time.perf_counter(), [None] * len(examples), []
            for idx, arr, mask in _batches(ids, predictor.batch_size, tokenizer.pad_id):
                length = predictor.length_bucket(arr.shape[1])
                analytic += [predictor.plan(length, s).analytic] * len(idx)
                batch = {"input_ids": arr, "attention_mask": mask}
                if labels:
                    scores = predictor.score(batch, *cands, speedup=s)  # [b, C]
                    for r, i in enumerate(idx):
                        preds[i] = int(np.argmax(scores[r]))
                else:
                    out = predictor.generate(batch, s, max_new_tokens=max_new_tokens)
                    for r, i in enumerate(idx):
                        preds[i] = tokenizer.decode([int(x) for x in out[r]])
                        if getattr(predictor, "first_line", False):  # a decoder runs on: its answer
                            preds[i] = (preds[i].strip().splitlines() or [""])[0]
            row = {"shots": k, "speedup": s, "analytic_speedup": float(np.mean(analytic)), "n": len(examples),
                   **stats, "seconds": time.perf_counter() - t0}
            if labels:
                row["accuracy"] = float(np.mean(np.array(preds) == gold))
                predictions[f"{k}-shot@{s:g}"] = [labels[p] for p in preds]
            else:
                row["exact_match"] = float(np.mean([exact_match(p, e.target) for p, e in zip(preds, examples)]))
                row["token_f1"] = float(np.mean([token_f1(p, e.target) for p, e in zip(preds, examples)]))
                predictions[f"{k}-shot@{s:g}"] = preds
            rows.append(row)
            if log:
                log(row)
    return {"task": task, "labels": list(labels) if labels else None, "n": len(examples), "rows": rows,
            "predictions": predictions}


# ---------------------------------------------------------------------------- decoders
def chat_messages(example: Example, exemplars: Sequence[Example] = ()) -> list[dict[str, str]]:
    """A chat conversation for a decoder: each exemplar a user turn (instruction + input) and
    the assistant's answer (its target), then the example's user turn; zero-shot is one turn."""
    def user(ex):
        return "\n\n".join(p for p in (ex.instruction, ex.input) if p)

    msgs = []
    for ex in exemplars:
        msgs += [{"role": "user", "content": user(ex)}, {"role": "assistant", "content": ex.target}]
    return msgs + [{"role": "user", "content": user(example)}]


def chat_renderer(template: str):
    """render(example, exemplars) -> the chat template applied, ending where the answer starts."""
    if not template:
        raise PromptDataError("the model has no chat template (tokenizer_config.json "
                              "'chat_template' or GGUF tokenizer.chat_template); use --prompt plain")
    return lambda ex, shown: render_chat(template, chat_messages(ex, shown))


RT_POLARITY_INSTRUCTION = ("Is the sentiment of this movie review positive or negative? "
                           "Answer with one word.")


def rt_polarity_examples(split: str = "validation", limit: int | None = None) -> list[Example]:
    """``rt_polarity`` (``accjax.data``, pinned PyPI source) as prompting examples: the
    instruction above, the review as input, 'positive' / 'negative' as target; file order,
    the first ``limit`` of them."""
    rows = data.rt_polarity_splits()[split]
    rows = rows[:limit] if limit else rows
    return [Example(RT_POLARITY_INSTRUCTION, r.text, "positive" if r.label == 1 else "negative")
            for r in rows]


class DecoderPredictor(generate.LMPredictor):
    """Label-likelihood scoring and greedy generation for a decoder LM (GPT-2, Llama) at any
    speedup, with the interface ``evaluate`` uses (as ``seq2seq.Seq2SeqPredictor``): prompts
    are padded and chunked as ``seq2seq.chunk_batch`` does, prefilled with ACC elimination,
    and each candidate answer scored by teacher forcing on the pruned KV caches::

        log p(answer | prompt) = sum_t log p(answer[t] | pruned prompt, answer[:t])

    ``chat_template``: render prompts with it (None: the plain 'Answer:' layout); the other
    arguments as ``Generator``'s.
    """

    first_line = True  # a generated answer ends at its first line break

    def __init__(self, module, params, config, *, chat_template: str | None = None,
                 batch_size: int = 8, length_buckets: Sequence[int] = (64, 128, 256, 512, 1024),
                 bucket: int = 8, floor: int = 1, acc_variant: str = "plain",
                 param_dtype: str | None = None):
        self.gen = generate.Generator(module, params, config, param_dtype=param_dtype,
                                      bucket=bucket, floor=floor, acc_variant=acc_variant)
        # (the generator's module and parameters: its LM head's table may be padded)
        self.module, self.config, self.cost, self.params = self.gen.module, config, self.gen.cost, self.gen.params
        self.batch_size = int(batch_size)
        self.length_buckets = inference.cap_buckets(config, length_buckets)
        self.render = chat_renderer(chat_template) if chat_template is not None else None
        # a chat answer starts a new turn; a plain one follows 'Answer:' after a space
        self.label_encoding = {"prefix": "" if chat_template is not None else " ",
                               "add_special_tokens": False}
        self.programs = programs.ProgramCache()
        self.bucket, self.floor = bucket, floor

    def _score_program(self, plan, c: int, width: int):
        module, sch = self.module, plan.schedule

        def run(params, ids, mask, cids, cmask):
            first, cache, _ = module.apply({"params": params}, ids, mask, max_new_tokens=width, schedule=sch,
                                           method="prefill")  # [B, V]
            # each candidate continues the same pruned caches
            return jnp.stack([(lm.continuation_logp(module, params, first, cache, jnp.broadcast_to(
                cids[j], (ids.shape[0], width))) * cmask[j]).sum(axis=1) for j in range(c)], axis=1)  # [B, C]

        spec = jax.ShapeDtypeStruct((self.batch_size, plan.length), jnp.int32)
        cspec = jax.ShapeDtypeStruct((c, width), jnp.int32)
        mspec = jax.ShapeDtypeStruct((c, width), jnp.float32)
        return self._compiled((plan.length, sch, c, width), run, spec, spec, cspec, mspec)

    def score(self, batch, cand_ids, cand_mask, speedup=1.0) -> np.ndarray:
        """[n, t] prompts, [C, L] candidates -> [n, C] log-likelihoods."""
        n, length, chunks = seq2seq.chunk_batch(self, batch)
        cand_ids, cand_mask = np.asarray(cand_ids, np.int32), np.asarray(cand_mask, np.float32)
        prog = self._score_program(self.plan(length, speedup), *cand_ids.shape)
        outs = [np.asarray(prog(self.params, i, m, cand_ids, cand_mask)) for i, m in chunks]
        return np.concatenate(outs)[:n]

    def generate(self, batch, speedup=1.0, *, max_new_tokens: int = 8) -> list[list[int]]:
        """[n, t] prompts -> per prompt the greedy tokens before the end-of-sequence token."""
        n, length, chunks = seq2seq.chunk_batch(self, batch)
        out = []
        for ids, mask in chunks:
            res = self.gen.generate(ids, mask, max_new_tokens=max_new_tokens, speedup=speedup)
            for toks, k in zip(res.tokens, res.lengths):
                toks = [int(x) for x in toks[:k]]
                out.append(toks[:-1] if toks and toks[-1] == self.config.eos_token_id else toks)
        return out[:n]
