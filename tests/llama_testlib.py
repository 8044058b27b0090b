"""Llama test helpers: random-init HF ``LlamaForCausalLM`` folders (save_pretrained), tiny
GGUF files written from them, and the real SmolLM2 checkpoint (``smollm2-135m``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Small, but with everything that can go wrong: GQA (4 query heads over 2 KV heads), a head
# size that is not D / N, untied head, Llama 3 rope scaling.
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)


def make_hf_llama(folder: Path, *, seed: int = 0, init: float = 0.3, **cfg):
    """Saves a random-init HF LlamaForCausalLM (save_pretrained); returns (folder, model).

    ``init`` is a large init scale, so greedy decoding does not settle on one token and a
    wrong rotation shows in the logits; norm weights are perturbed away from 1."""
    import torch
    import transformers

    kw = dict(TINY, initializer_range=init)
    kw.update(cfg)
    config = transformers.LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, model


def padded_batch(rng: np.random.Generator, lengths, t: int, vocab: int, pad_id: int = 0):
    """Right-padded input_ids/attention_mask with the given real lengths."""
    lengths = np.asarray(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), t)).astype(np.int64)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": np.where(mask == 1, ids, pad_id), "attention_mask": mask}


def jit_apply(module, params, batch, method=None, **static):
    import jax

    def run(p, b):
        return module.apply({"params": p}, **b, method=method, **static)

    return jax.jit(run)(params, batch)
