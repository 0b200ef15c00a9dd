"""Tiny tokenizers in the on-disk formats of real checkpoints (no PyTorch: bench/device.py uses
them on accelerator hosts without it)."""

import json

from transformers import CLIPTokenizer

from jdiff.app.caption_tokenizer import byte_symbols


def write_tiny_tokenizer(folder):
    """A byte-level BPE vocabulary small enough to write by hand, in CLIP's on-disk format."""
    chars = byte_symbols()
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"), ("circl", "e</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # Loaded with transformers directly: tests compare jdiff's loader against this.
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def write_tiny_t5_tokenizer(folder):
    """A SentencePiece-style unigram vocabulary of the shapes set's words (and single letters for
    the rest), saved as T5TokenizerFast saves: tokenizer.json, as released SD3/Flux folders have."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ("a an the small large red green blue yellow purple orange teal circle square triangle at top "
             "bottom left right center of and photo").split()
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [(f"\u2581{w}", -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"])
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0)
    tokenizer.save_pretrained(folder)
    return tokenizer
