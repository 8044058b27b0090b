"""GGUF files (llama.cpp's format) -> an HF-layout config, state dict and tokenizer.

A GGUF file holds its hyperparameters, its tokenizer and (possibly quantised) tensors in one
file. ``read`` turns it into what an HF folder would give: a ``config.json``-style dict, a
state dict with HF key names in fp32 (dequantised by the ``gguf`` package), so the family's
ordinary converter rules (``accjax.models.llama_family``) load it. ``tokenizer`` builds the
byte-level BPE tokenizer from the metadata. Only ``general.architecture == 'llama'`` is read.

Two things differ from an HF checkpoint:

  * names: ``blk.{i}.attn_q.weight`` is ``model.layers.{i}.self_attn.q_proj.weight``, etc.
    (``_NAMES``); ``output.weight`` is absent when the head is tied to ``token_embd``.
  * q and k rows: llama.cpp's converter permutes the rows of each head of q_proj/k_proj
    from HF's rotate-half layout (first half, second half) into interleaved pairs; the rows
    are put back here (``_unpermute``), for head size H and h heads::

        GGUF row order per head  [0, H/2, 1, H/2+1, ...]  ->  HF [0, 1, ..., H-1]

Every failure names the file and the problem: an unsupported architecture, a tensor type the
``gguf`` package cannot dequantise, a truncated file, missing metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from accjax.guards import CheckpointError

ARCHITECTURES = ("llama",)

# GGUF tensor name (after 'blk.{i}.') -> HF name (after 'model.layers.{i}.').
_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(CheckpointError):
    """A GGUF file accjax cannot read; the message names the file and the problem."""


@dataclasses.dataclass
class GGUFCheckpoint:
    """What ``read`` returns: ``config`` (HF config.json keys), ``state_dict`` (HF names,
    float32) and the raw ``metadata`` (key -> value, tokenizer arrays included)."""

    path: Path
    config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    metadata: dict[str, Any]


def find(folder: str | Path) -> Path | None:
    """The one ``*.gguf`` file of a folder (or the path itself if it is one); None if none."""
    p = Path(folder)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    files = sorted(p.glob("*.gguf")) if p.is_dir() else []
    if len(files) > 1:
        raise GGUFError(f"{p} holds several GGUF files ({[f.name for f in files]}); pass the file")
    return files[0] if files else None


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, KeyError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                        "truncated or corrupt: download it again") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; "
                        "download it again")
    return reader


def metadata(path: str | Path, reader=None) -> dict[str, Any]:
    """All metadata key -> value (strings, numbers, lists) of a GGUF file."""
    if reader is None:
        p = Path(path)
        if not p.is_file():
            raise GGUFError(f"GGUF file {p} does not exist")
        st = p.stat()
        return _cached_metadata(str(p.resolve()), st.st_size, st.st_mtime_ns)
    return _metadata(path, reader)


@functools.lru_cache(maxsize=2)
def _cached_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """Reading a 49k-token vocabulary takes seconds: once per file version."""
    return _metadata(path, _reader(Path(path)))


def _metadata(path, reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except Exception as e:  # a field gguf cannot decode: report it, do not guess
            raise GGUFError(f"{path}: metadata field {k!r} cannot be decoded ({e})") from None
    return out


def architecture(meta: dict[str, Any], path) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; accjax reads "
                        f"{', '.join(ARCHITECTURES)}")
    return arch


def hf_config(meta: dict[str, Any], path="GGUF") -> dict[str, Any]:
    """The HF ``config.json`` of a llama GGUF's metadata."""
    arch = architecture(meta, path)

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        return v

    n, d = int(get("attention.head_count")), int(get("embedding_length"))
    vocab = get("vocab_size", None, required=False)
    vocab = len(meta.get("tokenizer.ggml.tokens") or []) if vocab is None else vocab
    if not vocab:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    cfg = {
        "model_type": "llama", "vocab_size": int(vocab), "hidden_size": d,
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n,
        "num_key_value_heads": int(get("attention.head_count_kv", n)),
        "head_dim": int(get("rope.dimension_count", d // n)),
        "intermediate_size": int(get("feed_forward_length")),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))},
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", 2),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} in GGUF metadata is not supported")
    return cfg


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows -> HF's rotate-half rows; w [heads * H, D]."""
    h = w.shape[0] // heads
    return w.reshape(heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF key (None: a tensor accjax does not use, e.g. rope_freqs)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _NAMES:
        return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", name)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.weight"
    return None


def read(path: str | Path) -> GGUFCheckpoint:
    """A llama GGUF file -> HF config, HF-named fp32 state dict and metadata.

    Raises:
      GGUFError: unreadable/truncated file, unsupported architecture or tensor type.
    """
    from gguf import quants

    reader = _reader(path := Path(path))
    cfg = hf_config(meta := metadata(path, reader), path)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    sd, unknown = {}, []
    for t in reader.tensors:
        key = hf_name(t.name)
        if key is None:
            unknown.append(t.name)
            continue
        try:
            w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
        except NotImplementedError:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                "cannot dequantise; use a GGUF quantised as F32, F16, BF16, Q8_0, Q4_K, ...") from None
        # gguf lists shapes innermost first; numpy's order is the reverse (HF's [out, in]).
        w = w.reshape([int(s) for s in reversed(t.shape)]) if w.size == int(np.prod(t.shape)) else w
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads:
            w = _unpermute(w, heads[kind])
        sd[key] = w
    if unknown:
        raise GGUFError(f"{path}: tensors accjax does not know for a llama model: {unknown}")
    cfg["tie_word_embeddings"] = "lm_head.weight" not in sd
    return GGUFCheckpoint(path, cfg, sd, meta)


# --------------------------------------------------------------------------- tokenizer
# The split applied before byte-level BPE, by ``tokenizer.ggml.pre`` (llama.cpp's names).
# 'smollm' splits every digit on its own, then GPT-2's split; unknown names use GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer(meta: dict[str, Any], path="GGUF"):
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` metadata (byte-level
    BPE, ``tokenizer.ggml.model == 'gpt2'``); control tokens are special tokens, and the BOS
    token is prepended when ``tokenizer.ggml.add_bos_token`` says so."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (accjax builds "
                        "byte-level BPE, 'gpt2'); put the model's tokenizer.json next to it")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               ignore_merges=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama3", "llama-v3", "llama-bpe"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    if special := [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == 3]:  # 3: CONTROL
        tok.add_special_tokens(special)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tok


def chat_template(meta: dict[str, Any]) -> str | None:
    return meta.get("tokenizer.chat_template")


def folder_tokenizer(folder: str | Path):
    """The tokenizer of the GGUF file in ``folder`` (``tokenizers.Tokenizer``), or None when
    the folder holds no GGUF file."""
    path = find(folder)
    return None if path is None else tokenizer(metadata(path), path)
