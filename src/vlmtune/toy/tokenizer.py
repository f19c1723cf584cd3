"""A small word-level tokenizer with a letter-by-letter fallback, CLIP-style start/end tokens and padding.

Known words are one token each; any other word is spelled out in letter tokens, so every string tokenises
(uncommon class names become long, uninformative token sequences, as rare words do for BPE tokenizers).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

PAD, SOT, EOT, UNK = "<pad>", "<start_of_text>", "<end_of_text>", "<unk>"
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


class ToyTokenizer:
    """Maps text to (N, context_length) token ids; position of the end token is the pooling index."""

    def __init__(self, words: Sequence[str], context_length: int = 20) -> None:
        specials = [PAD, SOT, EOT, UNK]
        letters = [f"{c}</w>" for c in string.ascii_lowercase + string.digits + string.punctuation]
        self.vocab: list[str] = specials + letters + sorted(set(words))
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.context_length = context_length
        self.pad_id, self.sot_id, self.eot_id, self.unk_id = (self.index[t] for t in specials)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        ids: list[int] = []
        for word in _WORD.findall(text.lower().strip()):
            if word in self.index:
                ids.append(self.index[word])
            else:
                ids.extend(self.index.get(f"{c}</w>", self.unk_id) for c in word)
        return ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Tokenise texts to (N, context_length) long ids: SOT, tokens (truncated), EOT, padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[: self.context_length - 2], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token in each row of ``tokens`` (N, L) -> (N,)."""
        return (tokens == self.eot_id).int().argmax(dim=-1)
