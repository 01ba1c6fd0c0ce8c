"""Tokenisation throughput of the data room on this machine, on generated text.

Measures three layers, each on the same generated corpus and a byte-level BPE trained here:
  encode (1 thread)   tokenizers' encode_batch_fast with parallelism off;
  encode (all cores)  the same, parallel, which is what prepare_data uses;
  encode_packed       plus flattening into the packed uint16 array with EOS separators;
  prepare_data        end to end from JSONL files: JSON parsing, tokenising, writing working
                      and final shards, held-out split, manifest, atomic rename.

Usage: python bench/tokenize_throughput.py [--megabytes 20] [--vocab-size 16384] [--repeats 3]
Figures depend on the tokenizer (vocabulary, pre-tokeniser) and the text; real corpora with
GPT-2/Llama tokenizers will differ, so quote the tokenizer and text with any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from upcycle.data import DataConfig, prepare_data
from upcycle.data.encode import MAX_DOCUMENTS_PER_BATCH, encode_packed
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.data.tokenizer import load_tokenizer


def generate_corpus(megabytes: float, seed: int) -> list[str]:
    documents: list[str] = []
    characters = 0
    while characters < megabytes * 1e6:
        # A 50k-word lexicon, so that the BPE word cache (10k words) does not hold every word.
        batch = synthetic_documents(2000, seed=seed + len(documents), vocabulary_size=50_000)
        documents += batch
        characters += sum(len(d) for d in batch)
    return documents


def time_encode(tokenizer, documents: list[str], parallel: bool) -> tuple[float, int]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    start, tokens = time.perf_counter(), 0
    for first in range(0, len(documents), MAX_DOCUMENTS_PER_BATCH):
        batch = documents[first : first + MAX_DOCUMENTS_PER_BATCH]
        tokens += sum(
            len(e.ids) for e in tokenizer.backend.encode_batch_fast(batch, add_special_tokens=False)
        )
    return time.perf_counter() - start, tokens


def time_encode_packed(tokenizer, documents: list[str]) -> tuple[float, int]:
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    start, tokens = time.perf_counter(), 0
    for first in range(0, len(documents), MAX_DOCUMENTS_PER_BATCH):
        tokens += encode_packed(tokenizer, documents[first : first + MAX_DOCUMENTS_PER_BATCH])[0].size
    return time.perf_counter() - start, tokens


def time_prepare(tokenizer_dir: Path, documents: list[str], work: Path) -> tuple[float, int]:
    half = len(documents) // 2
    domains = {}
    for name, part in (("a", documents[:half]), ("b", documents[half:])):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        domains[name] = {"paths": [str(path)]}
    config = DataConfig(domains=domains, tokenizer=tokenizer_dir, heldout={"fraction": 0.01})
    start = time.perf_counter()
    manifest = prepare_data(config, work / "prepared", quiet=True, force=True)
    elapsed = time.perf_counter() - start
    return elapsed, sum(d.train.tokens + d.heldout.tokens for d in manifest.domains.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=20.0, help="size of the generated corpus")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per stage; the fastest counts")
    args = parser.parse_args()

    documents = generate_corpus(args.megabytes, args.seed)
    megabytes = sum(len(d.encode()) for d in documents) / 1e6
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tokenizer_dir = train_byte_level_bpe(documents[:3000], args.vocab_size, work / "tokenizer")
        # A fresh tokenizer per run: each starts with an empty BPE cache, as prepare_data does.
        # Best of `repeats`, since a shared 2-core VM is noisy.
        stages = {
            "encode (1 thread)": lambda: time_encode(
                load_tokenizer(tokenizer_dir), documents, parallel=False
            ),
            "encode (all cores)": lambda: time_encode(
                load_tokenizer(tokenizer_dir), documents, parallel=True
            ),
            "encode_packed": lambda: time_encode_packed(load_tokenizer(tokenizer_dir), documents),
            "prepare_data (jsonl)": lambda: time_prepare(tokenizer_dir, documents, work),
        }
        rows = [(name, *min(run() for _ in range(args.repeats))) for name, run in stages.items()]
        id_upper_bound = load_tokenizer(tokenizer_dir).id_upper_bound
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"
    )
    print(f"# corpus: {len(documents)} generated documents, {megabytes:.1f} MB UTF-8")
    print(f"# tokenizer: byte-level BPE, {id_upper_bound} ids, trained on 3000 of them")
    print(f"| {'stage':<22} | {'seconds':>8} | {'tokens':>11} | {'M tokens/s':>10} | {'MB/s':>7} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 13}|{'-' * 12}|{'-' * 9}|")
    for stage, seconds, tokens in rows:
        print(
            f"| {stage:<22} | {seconds:8.2f} | {tokens:11,} | {tokens / seconds / 1e6:10.2f} | "
            f"{megabytes / seconds:7.1f} |"
        )


if __name__ == "__main__":
    main()
