"""GPT-2 test helpers: random-init HF checkpoints, a tiny byte-level BPE tokenizer, batches.

No GPT-2 weights or tokenizer are reachable here, so the tests save randomly initialised
``transformers`` models with ``save_pretrained`` (the same files a downloaded ``gpt2`` folder
has) and train a small byte-level BPE on a few sentences (the same tokenizer.json format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENTENCES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to, 'tis a consummation",
]
EOS = "<|endoftext|>"


def make_tokenizer(folder: Path, vocab_size: int = 320):
    """Trains a byte-level BPE (GPT-2's kind) and saves ``folder/tokenizer.json``.

    Returns the ``tokenizers.Tokenizer``; '<|endoftext|>' is id 0.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def make_hf_gpt2(folder: Path, *, head: str = "lm", seed: int = 0, tokenizer: bool = False, **cfg):
    """Saves a random-init HF GPT-2 (save_pretrained) and returns (folder, torch model).

    head: 'lm' (GPT2LMHeadModel), 'base' (GPT2Model), 'sequence_classification'.
    tokenizer: also train and save a tiny tokenizer; the vocabulary then follows it.
    """
    import torch
    import transformers

    kw = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
              bos_token_id=0, eos_token_id=0)
    if tokenizer:
        kw["vocab_size"] = make_tokenizer(folder).get_vocab_size()
    kw.update(cfg)
    config = transformers.GPT2Config(**kw)
    torch.manual_seed(seed)
    cls = {"lm": transformers.GPT2LMHeadModel, "base": transformers.GPT2Model,
           "sequence_classification": transformers.GPT2ForSequenceClassification}[head]
    model = cls(config).eval()
    # Non-trivial LayerNorm and bias values, so a transposed or swapped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, model


def padded_batch(rng: np.random.Generator, lengths, t: int, vocab: int, pad_id: int = 0):
    """Right-padded input_ids/attention_mask with the given real lengths; real ids avoid pad_id."""
    lengths = np.asarray(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), t)).astype(np.int64)
    ids = np.where(ids == pad_id, 1, ids)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad_id)
    return {"input_ids": ids, "attention_mask": mask}


def jit_apply(module, params, batch, method=None, **static):
    """``module.apply`` under ``jax.jit`` (eager Flax dispatch is several times slower on CPU);
    ``static`` keyword arguments (schedule, flags) are baked into the program."""
    import jax

    def run(p, b):
        return module.apply({"params": p}, **b, method=method, **static)

    return jax.jit(run)(params, batch)


def check_generation_uses_the_pruned_cache(ld, batch) -> None:
    """A decoder (GPT-2, Llama) generating at 2x: the prefill keeps fewer rows in the last
    layer, each layer's cache holds its kept rows + the new tokens, and the tokens equal an
    explicit prefill + greedy ``extend`` loop's."""
    import jax
    import jax.numpy as jnp

    from accjax import generate
    from accjax import schedule as S

    gen = generate.Generator.from_loaded(ld)
    t = batch["input_ids"].shape[1]
    sch = gen.schedule(t, 2.0)
    assert sch[-1] < t and S.analytic_speedup(gen.cost, t, sch) > 1.5
    out = gen.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, speedup=2.0,
                       eos_token_id=None)
    assert [k.shape[1] for k in out.cache.keys] == [k + 6 for k in sch]
    first, cache, _ = jit_apply(ld.module, ld.params, batch, method="prefill", max_new_tokens=6,
                                schedule=sch)
    tok, toks = np.argmax(np.asarray(first), -1), []
    step = jax.jit(lambda par, t, c: ld.module.apply({"params": par}, t, c, method="extend"))
    for _ in range(6):
        toks.append(tok)
        logits, cache = step(ld.params, jnp.asarray(tok[:, None], jnp.int32), cache)
        tok = np.argmax(np.asarray(logits[:, 0]), -1)
    np.testing.assert_array_equal(out.tokens, np.stack(toks, 1))
