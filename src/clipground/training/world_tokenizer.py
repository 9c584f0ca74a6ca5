"""A small CLIP tokenizer for the synthetic world's vocabulary.

Real CLIP uses a 49k-token byte-level BPE; our world needs a few dozen words. We train a
byte-level BPE with exactly CLIP's normalisation and pre-tokenisation (``tokenizers``
library) on the world's words, and hand its vocabulary and merges to transformers'
:class:`~transformers.CLIPTokenizer`. The result saves and loads with
``CLIPTokenizer``/``AutoTokenizer``/``CLIPProcessor.from_pretrained(dir)`` like any hub
checkpoint. Every world word is one token; all 256 byte symbols (with and without the
end-of-word marker) are in the vocabulary, so an unknown word falls back to byte tokens
instead of failing or producing the end-of-text token mid-sentence.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: CLIP's pre-tokenisation pattern (words, digits, punctuation runs, English clitics).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def world_words() -> list[str]:
    """Every word the world's templates and the pretraining captions use."""
    from ..data.synthetic import COLOUR_NAMES, SHAPES, SIZES, TEMPLATES

    words = set(SHAPES) | set(COLOUR_NAMES) | set(SIZES)
    for temps in TEMPLATES.values():
        for t in temps:
            for w in t.replace("{np}", " ").replace("{x}", " ").replace("{y}", " ").split():
                words.add(w.lower())
    # Pretraining captions for non-object regions, plus common synonyms users may type.
    words |= {"part", "of", "and", "background", "an", "object", "shape", "thing", "big", "little",
              "grey", "gray", "colour", "color", "next", "near", "between", "in", "middle", "center", "centre"}
    return sorted(words)


def build_world_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 32):
    """Train the byte-level BPE on ``words`` (default :func:`world_words`) -> ``CLIPTokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = sorted(set(words if words is not None else world_words()))
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>")
    bpe.train_from_iterator([" ".join(words)], trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]

    # CLIP's id layout: 256 byte symbols, the same with "</w>", merge results, then specials
    # (end-of-text last, so even legacy "argmax of input_ids" pooling finds it).
    byte_syms = [s for _, s in sorted(bytes_to_unicode().items())]
    vocab: dict[str, int] = {}
    for tok in byte_syms + [s + "</w>" for s in byte_syms]:
        vocab.setdefault(tok, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for w in words:  # guard: each world word must be exactly one token
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"world tokenizer splits {w!r} into {len(ids)} tokens")
    return tok
