"""Tokenisation through a checkpoint's own ``tokenizer.json`` (HF ``tokenizers``).

``Tokenizer.encode`` returns unpadded id lists plus token types, and counts what truncation
cut; ``pad`` puts a batch into fixed [B, T] numpy arrays (T a length bucket), right-padded,
so every program sees one of a few static shapes.

Pairs are truncated ``longest_first`` (tokens come off the longer text first), as HF does.
A folder without tokenizer.json but with a BERT ``vocab.txt`` gets an equivalent WordPiece
tokenizer built from it (lower-casing as its tokenizer_config.json says); one with GPT-2's
``vocab.json`` + ``merges.txt`` a byte-level BPE; a GGUF model's, from its metadata.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from accjax import gguf_io


@dataclasses.dataclass
class Encoded:
    """A tokenised batch, not yet padded: per example the token ids (special tokens included)
    and segment ids (1 for the pair text; None: all 0); ``truncated`` examples lost tokens."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None = None
    truncated: int = 0

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(i) for i in self.ids], np.int32)


class Tokenizer:
    def __init__(self, tok, *, max_length: int = 512, pad_id: int | None = None):
        self._tok = tok
        self.max_length = max_length
        if pad_id is None:
            pad_id = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|endoftext|>")
                           if tok.token_to_id(t) is not None), 0)
        self.pad_id = int(pad_id)
        self.chat_template: str | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, *, max_length: int = 512) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        model_max = cfg.get("model_max_length")
        if isinstance(model_max, int) and 0 < model_max < max_length:
            max_length = model_max
        if (folder / "tokenizer.json").exists():
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").exists():
            from tokenizers import BertWordPieceTokenizer

            tok = BertWordPieceTokenizer(
                str(folder / "vocab.txt"), lowercase=cfg.get("do_lower_case", True))._tokenizer
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():  # older GPT-2 folders
            from tokenizers import ByteLevelBPETokenizer

            tok = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))._tokenizer
        elif (tok := gguf_io.folder_tokenizer(folder)) is None:  # a GGUF model carries its tokenizer inside
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json (or BERT vocab.txt, GPT-2 vocab.json + merges.txt); "
                "copy the tokenizer files of the model's original folder next to its weights")
        tok.no_padding()
        tok.no_truncation()
        out = cls(tok, max_length=max_length)
        # A chat model's template (Jinja; rendered by accjax.prompting.render_chat).
        out.chat_template = cfg.get("chat_template") or None
        if out.chat_template is None and (gguf := gguf_io.find(folder)) is not None:
            out.chat_template = gguf_io.chat_template(gguf_io.metadata(gguf))
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> Encoded:
        """Tokenises ``texts`` (and ``pairs``), truncating each example to ``max_length``."""
        max_length = min(max_length or self.max_length, self.max_length)
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        self._tok.enable_truncation(max_length, strategy="longest_first")
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encs = self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()
        return Encoded(ids=[e.ids for e in encs], type_ids=[e.type_ids for e in encs],
                       truncated=sum(1 for e in encs if e.overflowing))


def pad(encoded: Encoded, length: int, pad_id: int, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Right-pads to [B, length] numpy arrays: input_ids, attention_mask, token_type_ids.

    ``batch_size`` > number of examples appends rows holding only the first token (a valid
    one-token input), so a partial last batch reuses the full-batch program.
    """
    n = len(encoded.ids)
    b = batch_size or n
    if n > b:
        raise ValueError(f"{n} examples do not fit a batch of {b}")
    ids = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    types = np.zeros((b, length), np.int32)
    for i, x in enumerate(encoded.ids):
        if len(x) > length:
            raise ValueError(f"example {i} has {len(x)} tokens, more than the padded length {length}")
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
        types[i, :len(x)] = encoded.type_ids[i] if encoded.type_ids is not None else 0
    if n and b > n:
        ids[n:, 0] = ids[0, 0]
        mask[n:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
