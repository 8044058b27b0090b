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




def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (its converter's ``permute``),
    written here independently of ``accjax.gguf_io._unpermute``."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, *, arch: str = "llama", quant: str | None = "Q8_0",
               raw_type: str | None = None, chat_template: str | None = None) -> Path:
    """Writes an HF ``LlamaForCausalLM`` as a GGUF file the way llama.cpp's converter does
    (names, q/k row permutation, metadata, a byte-level vocabulary of placeholder tokens).

    quant: type of the 2-D projection tensors ('Q8_0', or None for F32).
    raw_type: store ``blk.0.ffn_up.weight`` as this type's raw zero bytes instead (a type
      the gguf package may not dequantise).
    """
    import gguf

    cfg = model.config
    n, g = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n)
    w.add_head_count_kv(g)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    alphabet = [chr(c) for c in range(0x21, 0x7f)]  # single printable characters, then pairs
    toks = ["<|endoftext|>", "<s>", "</s>"] + alphabet
    toks += [f"{a}{b}" for a in "abcdefgh" for b in "abcdefgh"][:cfg.vocab_size - len(toks)]
    assert len(toks) == cfg.vocab_size
    w.add_token_list(toks)
    w.add_token_types([3, 3, 3] + [1] * (len(toks) - 3))
    w.add_token_merges([f"{t[0]} {t[1]}" for t in toks[3 + len(alphabet):]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            rest = rest.rsplit(".", 1)[0]
            name = f"blk.{i}.{names[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = _permute(a, n)
            elif rest == "self_attn.k_proj":
                a = _permute(a, g)
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[key]
        if raw_type is not None and name == "blk.0.ffn_up.weight":
            qt = gguf.GGMLQuantizationType[raw_type]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((a.shape[0], a.shape[1] // block * size), np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)
        elif quant is not None and a.ndim == 2:
            qt = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
