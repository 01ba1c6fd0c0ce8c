"""Generated text and tiny tokenizers, for tests and benchmarks that must not download anything.

The text imitates the statistics that matter to a tokenizer: a Zipf-distributed vocabulary of
pronounceable pseudo-words, sentences with punctuation, paragraphs, some non-ASCII words. It is
deterministic per seed. The tokenizer is a byte-level BPE (GPT-2 style), which decodes every
string back exactly, so round-trip tests can demand equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["ß", "é", "ñ", "ø", "日本", "λό"]


def synthetic_documents(
    num_documents: int, seed: int = 0, mean_words: int = 120, vocabulary_size: int = 5000
) -> list[str]:
    """`num_documents` documents of pseudo-English, about `mean_words` words each."""
    rng = np.random.default_rng(seed)
    lexicon = _lexicon(rng, vocabulary_size)
    zipf_weights = 1.0 / np.arange(1, vocabulary_size + 1)
    zipf_weights /= zipf_weights.sum()
    documents = []
    for _ in range(num_documents):
        num_words = max(1, int(rng.exponential(mean_words)))
        words = lexicon[rng.choice(vocabulary_size, size=num_words, p=zipf_weights)]
        documents.append(_punctuate(words, rng))
    return documents


def train_byte_level_bpe(
    texts: list[str], vocab_size: int, out_dir: Path, eos_token: str = "<|endoftext|>"
) -> Path:
    """Train a byte-level BPE on `texts`, save `out_dir/tokenizer.json`, return `out_dir`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _lexicon(rng: np.random.Generator, size: int) -> np.ndarray:
    words = set()
    while len(words) < size:
        syllables = rng.choice(len(_SYLLABLES), size=int(rng.integers(1, 4)))
        words.add("".join(_SYLLABLES[s] for s in syllables))
    return np.array(sorted(words), dtype=object)


def _punctuate(words: np.ndarray, rng: np.random.Generator) -> str:
    pieces, sentence_length = [], int(rng.integers(5, 20))
    for index, word in enumerate(words, start=1):
        pieces.append(word.capitalize() if not pieces or pieces[-1].endswith((".", "\n\n")) else word)
        if index % sentence_length == 0:
            pieces[-1] += "." if rng.random() < 0.8 else ".\n\n"
        elif rng.random() < 0.05:
            pieces[-1] += ","
    return " ".join(pieces).replace("\n\n ", "\n\n") + "."
