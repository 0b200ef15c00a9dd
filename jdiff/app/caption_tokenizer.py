"""A CLIP-format tokenizer built from a caption set, for text encoders trained from scratch.

It is CLIP's byte-level BPE with a vocabulary of the 256 byte symbols (so any text tokenizes) plus
merges that make every word of the captions one token. It is written as
vocab.json + merges.txt, the files of released checkpoints, so `transformers.CLIPTokenizer`,
`jdiff.load_tokenizer` and diffusers all load it.
"""

import json
import re
from typing import Iterable

from jdiff.convert import load_tokenizer
from jdiff.paths import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
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


def _apply_merges(pieces: list[str], ranks: dict) -> list[str]:
    """BPE as CLIP applies it: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_caption_tokenizer(folder, captions: Iterable[str], max_length: int = 77):
    """Writes the tokenizer for `captions` into `folder` and loads it back."""
    folder = Path(folder)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    known = set(tokens)
    ranks: dict = {}  # merge -> rank (its line in merges.txt)
    for word in caption_words(captions):
        # Each new merge joins the first two pieces of what all merges so far make of the word.
        # BPE applies merges by rank, not left to right, so a plain letter chain per word could be
        # cut short by an earlier word's merge (the "ri" of "right" inside "triangle").
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            if pieces[0] + pieces[1] not in known:
                known.add(pieces[0] + pieces[1])
                tokens.append(pieces[0] + pieces[1])
            pieces = _apply_merges(pieces, ranks)
    merges = list(ranks)
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS, "eos_token": EOS,
        "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}, indent=2))
    return load_tokenizer(folder, max_length)
