"""Write a tiny word-level vocabulary in CLIPTokenizer's vocab.json / merges.txt format.

Every word of the starter vocabulary becomes one token; any other word falls back
to single characters, so the standard `CLIPTokenizer` loads and runs it unchanged.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) so that each word in `words` encodes to exactly one token."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    characters = string.ascii_lowercase + string.digits + string.punctuation
    for ch in characters:
        add(ch)
    for ch in characters:
        add(ch + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            pair = (left, right)
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            add(left)
    for token in SPECIAL_TOKENS:
        add(token)
    return vocab, merges


def write_tokenizer(folder: Path, words: list[str], max_length: int) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs into `folder`; return the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>"}, indent=2)
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "do_lower_case": True,
                "errors": "replace",
            },
            indent=2,
        )
    )
    return len(vocab)
