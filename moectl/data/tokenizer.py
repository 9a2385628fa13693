"""Tokenizers: loading a tokenizer.json, training a byte-level BPE, and a run's own tokenizer.

`Tokenizer` wraps a Hugging Face `tokenizers` tokenizer with what moectl needs of it: encode,
decode, the end-of-text id and the vocabulary size. `load_run_tokenizer` reads the tokenizer a run
was trained with (its tokenizer.json) without touching the data or its cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moectl.data.sources import DataError
from moectl.rundir import TOKENIZER

EOT = "<|endoftext|>"
EOT_CANDIDATES = (EOT, "</s>", "<eos>", "<|end_of_text|>")


def load_tokenizer(path: str | Path, what: str = "data.tokenizer.path"):
    """(tokenizers.Tokenizer, path of its tokenizer.json) from a file or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER
    if not p.is_file():
        raise DataError(f"{what}: no tokenizer at {path}",
                        hint="give a tokenizer.json or a folder that contains one")
    try:
        return tokenizers.Tokenizer.from_file(str(p)), p
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{what}: {p} is not a valid tokenizer.json ({e})") from None


def eot_id_of(tok, wanted: str | None) -> int:
    names = (wanted,) if wanted else EOT_CANDIDATES
    for name in names:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise DataError(f"the tokenizer has no end-of-text token (looked for {', '.join(names)})",
                    hint="set data.tokenizer.eot_token to a token of its vocabulary")


def train_bpe(docs: Iterator[str], vocab_size: int, train_bytes: int):
    def limited() -> Iterator[str]:
        seen = 0
        for text in docs:
            yield text
            seen += len(text)
            if seen >= train_bytes:
                return

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(limited(), trainer)
    return tok


def template_tokens(inner) -> tuple[list[int], list[int]]:
    """The ids a tokenizer's own template (its post-processor) puts before and after every text
    (a Llama tokenizer's BOS before), found by encoding a probe with and without it."""
    probe = "moectl probe"
    plain = inner.encode(probe, add_special_tokens=False).ids
    full = inner.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []   # a template that changes the text's own tokens: none is used


@dataclass
class Tokenizer:
    """A loaded tokenizer with its end-of-text id. With `add_special_tokens` a whole text (a
    document, a prompt) gets the tokenizer's template tokens, as transformers' tokenizers add them
    by default (an imported Llama's BOS); pieces of a text (a continuation) never do."""

    inner: Any          # tokenizers.Tokenizer
    eot_id: int
    path: Path
    add_special_tokens: bool = False

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """The ids of a piece of text, without special tokens."""
        return self.inner.encode(text, add_special_tokens=False).ids

    def template(self) -> tuple[list[int], list[int]]:
        """(ids before, ids after) a whole text: the template's, with add_special_tokens; else none."""
        return template_tokens(self.inner) if self.add_special_tokens else ([], [])

    def encode_text(self, text: str) -> list[int]:
        """The ids of a whole text (a prompt): with add_special_tokens, what transformers' tokenizer gives."""
        return self.inner.encode(text, add_special_tokens=self.add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each token id stands for; 0 for special tokens (end-of-text).
        Exact for byte-level BPE (each character of a token is one byte); otherwise the length of
        the token decoded alone, which can differ by a space at word starts."""
        inner = self.inner
        special = {t.content for t in inner.get_added_tokens_decoder().values() if t.special}
        byte_level = type(inner.decoder).__name__ == "ByteLevel"
        out = []
        for i in range(self.vocab_size):
            piece = inner.id_to_token(i)
            if piece is None or piece in special:
                out.append(0)
            else:
                out.append(len(piece) if byte_level else len(inner.decode([i]).encode("utf-8")))
        return out


def load_run_tokenizer(path: Path, eot_token: str | None = None, add_special_tokens: bool = False) -> Tokenizer:
    """The tokenizer a run was trained with (its tokenizer.json, `path`); no data is read."""
    inner, path = load_tokenizer(path, what=str(Path(path).parent))
    return Tokenizer(inner, eot_id_of(inner, eot_token), path, add_special_tokens)
