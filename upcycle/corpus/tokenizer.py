"""Train a small byte-level BPE tokenizer on a built corpus, in the Hugging Face folder format.

The folder holds `tokenizer.json` (the whole text → ids definition), `tokenizer_config.json` and
`special_tokens_map.json` (which tokens are EOS/BOS/PAD), so `transformers`'
`PreTrainedTokenizerFast.from_pretrained(folder)`, `AutoTokenizer` and `upcycle.data`'s loader
all read it. Special tokens come first: `<|endoftext|>` = 0 (EOS, written between documents),
`<|startoftext|>` = 1 (BOS), `<|pad|>` = 2.

Unusual choices, and why:
- Byte-level (GPT-2 style), no normaliser: every string, code indentation and `\\r\\n` included,
  decodes back to itself exactly.
- Digits are split one by one before BPE (as Llama and many others do), so numbers are spelled
  digit by digit and arithmetic in the math domain is learnable rather than a lookup of
  whichever digit groups happened to be frequent.
- Training reads the same number of bytes from every domain (`sample_bytes_per_domain`, from
  the start of each file, which is already in seeded order), so one domain's size does not buy it
  a larger share of the vocabulary, and a 100 MB corpus trains as fast as a 2 MB one.
- The result is cached: `upcycle_tokenizer.json` records the corpus hashes and settings it was
  trained from; the same request returns the folder without training.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from upcycle.checkpoint.atomic import atomic_output_dir
from upcycle.corpus.build import CorpusInfo, load_corpus

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "new_byte_level_bpe",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
TRAINING_RECORD = "upcycle_tokenizer.json"
_FORMAT_VERSION = 1


def new_byte_level_bpe() -> Tokenizer:
    """An untrained tokenizer with this module's pipeline: digits split, then byte-level BPE."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(
    corpus: CorpusInfo | Path | str,
    out_dir: Path | str | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    sample_bytes_per_domain: int = 2_000_000,
    quiet: bool = False,
    force: bool = False,
) -> Path:
    """Train on `corpus` (a `CorpusInfo` or its folder); save into `out_dir`; return the folder.

    `out_dir` defaults to `<corpus>/tokenizer`. The folder is written atomically and reused when
    it was trained from the same corpus bytes with the same settings (unless `force`).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes and specials)")
    info = corpus if isinstance(corpus, CorpusInfo) else load_corpus(corpus)
    out_dir = Path(out_dir) if out_dir is not None else info.root / "tokenizer"
    record = {
        "format": _FORMAT_VERSION,
        "tokenizers": tokenizers.__version__,
        "vocab_size": vocab_size,
        "sample_bytes_per_domain": sample_bytes_per_domain,
        "corpus_sha256": {name: domain.sha256 for name, domain in sorted(info.domains.items())},
    }
    if not force and _recorded(out_dir) == record and (out_dir / "tokenizer.json").is_file():
        return out_dir
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=not quiet and sys.stderr.isatty(),  # its bar is noise in logs
    )
    tokenizer.train_from_iterator(_training_texts(info, sample_bytes_per_domain), trainer)
    with atomic_output_dir(out_dir, overwrite=True) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", _tokenizer_config())
        _write_json(
            staging / "special_tokens_map.json",
            {"eos_token": EOS_TOKEN, "bos_token": BOS_TOKEN, "pad_token": PAD_TOKEN},
        )
        _write_json(staging / TRAINING_RECORD, record)
    return out_dir


def _training_texts(info: CorpusInfo, sample_bytes: int) -> Iterator[str]:
    """Documents from the start of each domain file, `sample_bytes` of text per domain."""
    for name in sorted(info.domains):
        taken = 0
        with open(info.path(name), encoding="utf-8") as lines:
            for line in lines:
                text = json.loads(line)["text"]
                yield text
                taken += len(text.encode("utf-8"))
                if taken >= sample_bytes:
                    break


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": BOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def _recorded(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
