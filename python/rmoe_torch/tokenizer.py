"""The tokenizers an RMoE export names in rmoe_tokenizer.json."""

from __future__ import annotations

import os
from typing import List, Sequence

from .config import TokenizerInfo


class ByteTokenizer:
    """token id = byte value (vocabulary 256); the document separator is '\\n' (10)."""

    def __init__(self, info: TokenizerInfo):
        self.info = info

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # A cut in the middle of a multi-byte character decodes as U+FFFD, not an error.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece BPE model (byte fallback, no normalisation) from tokenizer.model."""

    def __init__(self, info: TokenizerInfo, model_file: str):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError(
                "this export uses a BPE tokenizer (tokenizer.model): install the "
                "`sentencepiece` package to encode or decode text, or pass token ids") from e
        self.info = info
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        if self.sp.get_piece_size() != info.vocab_size:
            raise ValueError(f"{model_file} has {self.sp.get_piece_size()} pieces, "
                             f"rmoe_tokenizer.json says {info.vocab_size}")

    def encode(self, text: str) -> List[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def open_tokenizer(export_dir: str, info: TokenizerInfo):
    if info.type == "byte":
        return ByteTokenizer(info)
    return SentencePieceTokenizer(info, os.path.join(export_dir, info.file))
