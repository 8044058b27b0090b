"""Random-init HF T5 checkpoints (saved with save_pretrained), a tiny tokenizer, batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Flan-T5 structure (gated-GELU, untied head, no output scaling), tiny sizes. Each config
# differs in depth, heads, widths (N*H != D in the second) and the bucket geometry; the
# short max_distance of the first makes the logarithmic buckets matter at these lengths.
FLAN_CONFIGS = {
    "L2-D3-N4-D32": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "L3-D2-N6-D48": dict(d_model=48, d_kv=6, num_heads=6, d_ff=64, num_layers=3, num_decoder_layers=2,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         layer_norm_epsilon=1e-5),
}

WORDS = ("positive negative neutral the a movie film was is good bad great awful fine "
         "review sentiment answer question what color sky blue red green yes no it this "
         "very not really quite liked hated loved boring fun plot acting").split()


def make_hf_t5(folder: Path, *, head: str = "lm", seed: int = 0, untied: bool = True,
               vocab_size: int = 99, **cfg):
    """Saves a random-init HF T5 with save_pretrained; returns (folder, torch model).

    ``untied`` gives the LM head its own random matrix (Flan-T5); transformers 5 builds a
    tied head for every new T5, and save_pretrained then writes ``lm_head.weight`` too. Its
    std is d_model**-0.5 (HF's init uses 1.0), so logits are O(1) as in trained models and
    the 1e-5 tolerance measures the arithmetic rather than float32 rounding of +-20 logits.
    """
    import torch
    import transformers

    kw = dict(vocab_size=vocab_size, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
              pad_token_id=0, eos_token_id=1, tie_word_embeddings=not untied, dropout_rate=0.0)
    kw.update(FLAN_CONFIGS["L2-D3-N4-D32"])
    kw.update(cfg)
    config = transformers.T5Config(**kw)
    torch.manual_seed(seed)
    cls = {"lm": transformers.T5ForConditionalGeneration, "base": transformers.T5EncoderModel}[head]
    model = cls(config)
    with torch.no_grad():
        # Non-trivial norm scales, so a swapped or missing norm shows.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        if head == "lm" and untied:
            model.lm_head.weight = torch.nn.Parameter(
                torch.randn(vocab_size, config.d_model) * config.d_model ** -0.5)
    model.eval()
    model.save_pretrained(folder)
    return folder, model


def random_batch(rng: np.random.Generator, b: int, t: int, vocab: int, *, min_len: int = 2,
                 lengths=None):
    """input_ids [B, T] ending in EOS (1) with right padding (0); row 0 full length unless
    ``lengths`` are given."""
    if lengths is None:
        lengths = rng.integers(min_len, t + 1, size=b)
        lengths[0] = t
    lengths = np.asarray(lengths)
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int64)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    ids[np.arange(b), lengths - 1] = 1
    ids = np.where(mask == 1, ids, 0)
    return {"input_ids": ids, "attention_mask": mask}


def decoder_batch(rng: np.random.Generator, b: int, t: int, vocab: int):
    """decoder_input_ids starting with the start token 0, with padding; and its mask."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    ids = rng.integers(3, vocab, size=(b, t)).astype(np.int64)
    ids[:, 0] = 0
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, 0), mask


def make_tokenizer(folder: Path, words=WORDS) -> Path:
    """A WordLevel tokenizer.json with T5's special ids (<pad>=0, </s>=1, <unk>=2) that
    appends </s> to every text, as the T5 tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    for s in ("<pad>", "</s>", "<unk>"):
        tok.add_special_tokens([s])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return folder
