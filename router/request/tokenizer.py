"""The checkpoint's tokenizer (`tokenizer.json`, through the tokenizers library)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tok: _HFTokenizer):
        self._tok = tok

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        path = Path(model_dir) / "tokenizer.json"
        return cls(_HFTokenizer.from_file(str(path))) if path.is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; the post-processor adds <|begin_of_text|> when `add_special_tokens`."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_ids(self) -> set[int]:
        """Ids of the special (control) tokens: never part of generated text."""
        return {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}

    def encoded_vocab(self, size: int) -> list[str]:
        """Each id's token string as the tokenizer stores it (byte-level encoded); "" for ids without a token and for
        special tokens (so a grammar never allows them inside text)."""
        out = [""] * size
        special = self.special_ids()
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i < size and i not in special:
                out[i] = token
        return out

    def serialized(self) -> str:
        """tokenizer.json's text (its pre-tokenizer and decoder say how tokens are encoded)."""
        return self._tok.to_str()
