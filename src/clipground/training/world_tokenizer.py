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

import re
from collections.abc import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


#: Words of the pretraining captions for regions that are not one object.
CAPTION_WORDS = ("part", "of", "a", "and", "background", "around")


def world_words(phrasing: str = "v1") -> list[str]:
    """Every word the world's grammar (of ``phrasing``) and the pretraining captions use.

    ``v1`` is the first world CLIP's vocabulary (its templates plus a few words users type);
    ``rich`` is exactly the words the rich grammar says (:data:`~clipground.data.world.grammar.FORMS`,
    its noun phrases) and the captions, each of which :mod:`clipground.relations` understands.
    """
    from ..data.world import COLOUR_NAMES, SHAPES, SIZES, TEMPLATES
    from ..data.world.grammar import FORMS, GENERIC_NOUNS, SIZE_WORDS

    words = set(SHAPES) | set(COLOUR_NAMES) | set(SIZES)
    if phrasing == "rich":
        words |= set(SIZE_WORDS) | set(GENERIC_NOUNS) | set(CAPTION_WORDS) | {"an"}
        for rels in FORMS.values():
            for fs in rels.values():
                for f in fs:
                    for w in f.replace("{x}", " ").replace("{y}", " ").replace("{z}", " ").split():
                        words |= set(re.findall(r"\d+|\D+", w))  # CLIP splits digits off ("2nd": "2", "nd")
        return sorted(words)
    for temps in TEMPLATES.values():
        for t in temps:
            for w in t.replace("{np}", " ").replace("{x}", " ").replace("{y}", " ").split():
                words.add(w.lower())
    # Pretraining captions for non-object regions, plus common synonyms users may type.
    words |= {"part", "of", "and", "background", "an", "object", "shape", "thing", "big", "little",
              "grey", "gray", "colour", "color", "next", "near", "between", "in", "middle", "center", "centre"}
    return sorted(words)


def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges that turn every word into one ``word</w>`` token.

    The ``tokenizers`` trainer breaks frequency ties by hash order, so its token ids change
    from run to run; a resumed pretraining run (or a second build) must get the same ids.
    This is the textbook greedy BPE loop with ties broken lexicographically. Applying the
    merges in rank order (what the BPE model does at inference) reproduces these
    segmentations exactly.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    seqs = []
    for w in sorted(set(words)):
        syms = [b2u[b] for b in w.encode("utf-8")]
        if syms:
            syms[-1] += "</w>"
            seqs.append(syms)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for syms in seqs:
            for pair in zip(syms, syms[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, syms in enumerate(seqs):
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            seqs[k] = out


def build_world_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 32):
    """Byte-level BPE over ``words`` (default :func:`world_words`) as a ``CLIPTokenizer``.

    Deterministic: the same words always give the same vocabulary and ids.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = sorted({w.lower() for w in (words if words is not None else world_words())})
    merges = _learn_merges(words)

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


BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_world_bert_tokenizer(phrasing: str = "rich", model_max_length: int = 32):
    """A WordPiece ``BertTokenizer`` (what ``BlipProcessor`` expects) over the world's words.

    Every world word (whole, as BERT's pre-tokenizer leaves "2nd" whole) is one token; single
    letters and digits, bare and as ``##`` continuations, make any other lowercase word a
    letter sequence instead of ``[UNK]``. Deterministic ids; saves and loads with
    ``BertTokenizer``/``BlipProcessor.from_pretrained(dir)``.
    """
    import string
    import tempfile
    from pathlib import Path

    from transformers import BertTokenizer

    from ..data.world.grammar import FORMS

    words = set(world_words(phrasing))
    for rels in FORMS.values():
        for fs in rels.values():
            for f in fs:
                words |= set(f.replace("{x}", " ").replace("{y}", " ").replace("{z}", " ").split())
    chars = string.ascii_lowercase + string.digits
    pieces = list(chars) + ["##" + c for c in chars] + list(string.punctuation)
    vocab = list(BERT_SPECIALS) + sorted(words - set(pieces)) + pieces
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tok = BertTokenizer(str(path), do_lower_case=True, model_max_length=model_max_length)
    for w in words:
        if len(tok(w, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"world BERT tokenizer splits {w!r}")
    return tok
