"""Our tokenizer wrapper vs HF's fast tokenizer on the real MiniLM vocabulary."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import transformers

from accjax.tokenization import Tokenizer, pad

TEXTS = ["Hello world, this is accjax!", "a " * 40, "Ünïcödé text — with dashes", ""]
PAIRS = ["second segment here", "short", "b " * 50, "only pair"]


def test_pairs_and_truncation_match_hf(minilm_dir):
    ours = Tokenizer.from_folder(minilm_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = ours.encode(TEXTS, PAIRS, max_length=24)
    r = ref(TEXTS, PAIRS, truncation="longest_first", max_length=24)
    assert enc.ids == r["input_ids"]
    assert enc.type_ids == r["token_type_ids"]
    assert enc.truncated == 2  # the two long examples lost tokens
    assert max(len(i) for i in enc.ids) == 24


def test_vocab_txt_fallback_equals_tokenizer_json(minilm_dir, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    a = Tokenizer.from_folder(minilm_dir).encode(TEXTS, PAIRS)
    b = Tokenizer.from_folder(tmp_path).encode(TEXTS, PAIRS)
    assert a.ids == b.ids and a.type_ids == b.type_ids


def test_pad_to_bucket_and_partial_batch(minilm_dir):
    tok = Tokenizer.from_folder(minilm_dir)
    enc = tok.encode(TEXTS[:3])
    with pytest.raises(ValueError, match="example 1 has 42 tokens, more than the padded length 32"):
        pad(enc, 32, tok.pad_id)
    batch = pad(enc, 64, tok.pad_id, batch_size=4)
    assert batch["input_ids"].shape == (4, 64)
    assert list(batch["attention_mask"].sum(1)[:3]) == [len(i) for i in enc.ids]
    assert batch["attention_mask"][3].sum() == 1  # filler row: one valid token
    assert np.all(batch["input_ids"][:3][batch["attention_mask"][:3] == 0] == tok.pad_id)
