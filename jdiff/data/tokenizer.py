"""A CLIP-format tokenizer built from a caption set, for text encoders trained from scratch.

It is CLIP's byte-level BPE with a vocabulary of the 256 byte symbols (so any text tokenizes) plus
one merge chain per caption word (so every word of the captions is one token). It is written as
vocab.json + merges.txt, the files of released checkpoints, so `transformers.CLIPTokenizer`,
`jdiff.load_tokenizer` and diffusers all load it.
"""

import json
import re
from pathlib import Path
from typing import Iterable

from jdiff.convert import load_tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's byte-to-character table: printable bytes stand for themselves, the others are
    shifted past 255, so every byte has a visible one-character symbol."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def caption_words(captions: Iterable[str]) -> list[str]:
    """The distinct lower-case words of the captions, in order of first appearance."""
    seen = {}
    for text in captions:
        for word in re.findall(r"[a-z]+", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def write_caption_tokenizer(folder, captions: Iterable[str], max_length: int = 77):
    """Writes the tokenizer for `captions` into `folder` and loads it back."""
    folder = Path(folder)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    merges = []
    for word in caption_words(captions):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                tokens.append(merged)
                known.add(merged)
            left = merged
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
        "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}, indent=2))
    return load_tokenizer(folder, max_length)
