"""prepare_data: exact round trip, dtype choice, held-out split, fingerprint, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from upcycle.data import DataConfig, load_manifest, prepare_data
from upcycle.data.encode import encode_packed
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.data.tokenizer import load_tokenizer, token_dtype

EOS = "<|endoftext|>"
TRICKY_DOCUMENTS = [
    "line one\r\nline two\n",
    "  leading and trailing spaces  ",
    "emoji 🙂, 日本語, ß and a\ttab",
    f"a document that mentions {EOS} literally",
    "",  # empty: skipped and counted, never written
    "x",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_byte_level_bpe(synthetic_documents(200, seed=7), 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def backend(tokenizer_dir) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def write_text_domain(folder: Path, documents: list[str]) -> Path:
    folder.mkdir(parents=True)
    for index, text in enumerate(documents):
        (folder / f"{index:04d}.txt").write_bytes(text.encode())
    return folder


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(documents)))
    return path


def split_documents(tokens: np.ndarray, eos_id: int, backend: Tokenizer) -> list[str]:
    """Decode a packed stream back into its documents (every document ends with EOS)."""
    assert tokens.size == 0 or tokens[-1] == eos_id
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends + 1])[:-1]
    return [
        backend.decode(tokens[s:e].tolist(), skip_special_tokens=False)
        for s, e in zip(starts, ends, strict=True)
    ]


def stream(manifest, domain, split) -> np.ndarray:
    tokens = manifest.token_stream(domain, split)
    return tokens.read(0, tokens.num_tokens)


def test_round_trip_is_exact_for_text_and_jsonl(tmp_path, tokenizer_dir, backend):
    documents = TRICKY_DOCUMENTS + synthetic_documents(40, seed=1)
    config = DataConfig(
        domains={
            "prose": {"paths": [str(write_text_domain(tmp_path / "prose", documents))]},
            "chat": {"paths": [str(write_jsonl(tmp_path / "chat.jsonl", documents))]},
        },
        tokenizer=tokenizer_dir,
        heldout={"tokens": 300},
    )
    manifest = prepare_data(config, tmp_path / "out", quiet=True)
    kept = [d for d in documents if d]
    for domain in ("prose", "chat"):
        train_tokens = stream(manifest, domain, "train")
        train = split_documents(train_tokens, manifest.eos_id, backend)
        heldout = split_documents(stream(manifest, domain, "heldout"), manifest.eos_id, backend)
        assert heldout and sorted(train + heldout) == sorted(kept)
        assert train == [d for d in kept if d in set(train)]  # source order kept in each split
        assert heldout == [d for d in kept if d in set(heldout)]
        # Token-exact: a split is encode(doc) + [EOS] for each of its documents, in order.
        expected = [
            token
            for d in train
            for token in [*backend.encode(d, add_special_tokens=False).ids, manifest.eos_id]
        ]
        assert train_tokens.tolist() == expected
        # The literal "<|endoftext|>" inside a document did not become a boundary.
        assert int((train_tokens == manifest.eos_id).sum()) == len(train)
        record = manifest.domains[domain]
        assert record.empty_documents_skipped == 1
        assert (record.train.documents, record.heldout.documents) == (len(train), len(heldout))
        assert record.train.tokens == train_tokens.size


def test_parquet_source_and_add_bos(tmp_path, tokenizer_dir, backend):
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = ["first document", None, "second 🙂", "third"]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": documents, "n": [1, 2, 3, 4]}), tmp_path / "pq" / "part.parquet")
    bos_tokenizer = tmp_path / "tok_bos"
    bos_tokenizer.mkdir()
    (bos_tokenizer / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (bos_tokenizer / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))
    config = DataConfig(
        domains={"web": {"paths": [str(tmp_path / "pq")], "text_field": "content"}},
        tokenizer=bos_tokenizer,
        heldout={"fraction": 0.0},
        add_bos=True,
    )
    manifest = prepare_data(config, tmp_path / "out", quiet=True)
    expected = []
    for text in filter(None, documents):
        expected += [manifest.bos_id, *backend.encode(text, add_special_tokens=False).ids, manifest.eos_id]
    assert stream(manifest, "web", "train").tolist() == expected
    assert manifest.domains["web"].empty_documents_skipped == 1
    assert manifest.domains["web"].sources[0].format == "parquet"


def test_tokenizer_folder_saved_by_transformers(tmp_path, tokenizer_dir, backend):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "hf_tok"
    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"), eos_token=EOS
    ).save_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.eos_token, tokenizer.eos_id) == (EOS, backend.token_to_id(EOS))
    tokens, lengths = encode_packed(tokenizer, ["hello there", ""])
    assert tokens.tolist() == [*backend.encode("hello there").ids, tokenizer.eos_id]
    assert lengths.tolist() == [tokens.size, 0]


def test_folder_without_tokenizer_json_loads_through_transformers(tmp_path):
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "##s"])
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    tokenizer = load_tokenizer(folder, eos_token="[SEP]")
    tokens, _ = encode_packed(tokenizer, ["Hello worlds"])
    assert tokens.tolist() == [4, 5, 6, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=6))
def test_packing_decodes_to_the_documents_for_any_text(tokenizer_dir, backend, documents):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens, lengths = encode_packed(tokenizer, documents)
    assert split_documents(tokens, tokenizer.eos_id, backend) == [d for d in documents if d]
    assert lengths.sum() == tokens.size and ((lengths == 0) == (np.array([d == "" for d in documents]))).all()


def word_level_tokenizer(folder: Path, vocab_size: int) -> Path:
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([EOS])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_dtype_follows_vocabulary_size(tmp_path):
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    cases = {
        np.uint16: (word_level_tokenizer(tmp_path / "small", 2**16), ["w1 w65535", "w7 w3"]),
        np.uint32: (word_level_tokenizer(tmp_path / "large", 2**16 + 1), ["w1 w65535", "w65536 w2"]),
    }
    for dtype, (tokenizer, documents) in cases.items():
        data = write_jsonl(tmp_path / f"{dtype.__name__}.jsonl", documents)
        config = DataConfig(domains={"d": {"paths": [str(data)]}}, tokenizer=tokenizer, heldout={"tokens": 0})
        manifest = prepare_data(config, tmp_path / f"out_{dtype.__name__}", quiet=True)
        assert manifest.dtype == np.dtype(dtype).name
        shard = manifest.root / manifest.domains["d"].train.shards[0].file
        assert shard.stat().st_size == manifest.domains["d"].train.tokens * np.dtype(dtype).itemsize
    assert stream(manifest, "d", "train").tolist() == [1, 65535, 0, 65536, 2, 0]  # > uint16 kept intact


def heldout_documents(manifest, backend) -> list[str]:
    return split_documents(stream(manifest, "prose", "heldout"), manifest.eos_id, backend)


def test_heldout_is_whole_documents_disjoint_and_deterministic(tmp_path, tokenizer_dir, backend):
    documents = [f"doc {i}. " + text for i, text in enumerate(synthetic_documents(80, seed=3))]
    folder = write_text_domain(tmp_path / "prose", documents)

    def prepare(out: str, seed: int, heldout: dict, extra_domain: bool = False):
        domains = {"prose": {"paths": [str(folder)]}}
        if extra_domain:
            domains["another"] = {"paths": [str(folder)]}
        config = DataConfig(domains=domains, tokenizer=tokenizer_dir, heldout=heldout, seed=seed)
        return prepare_data(config, tmp_path / out, quiet=True)

    first = prepare("a", seed=0, heldout={"tokens": 1000})
    again = prepare("b", seed=0, heldout={"tokens": 1000}, extra_domain=True)
    other_seed = prepare("c", seed=1, heldout={"tokens": 1000})
    held = heldout_documents(first, backend)
    train = split_documents(stream(first, "prose", "train"), first.eos_id, backend)
    assert set(held).isdisjoint(train) and sorted(held + train) == sorted(documents)
    held_tokens = first.domains["prose"].heldout.tokens
    longest = max(len(backend.encode(d).ids) + 1 for d in documents)
    assert 1000 <= held_tokens < 1000 + longest
    # Same seed: identical bytes, even with another domain added; another seed: another split.
    for split in ("train", "heldout"):
        for shard_a, shard_b in zip(
            first.split("prose", split).shards, again.split("prose", split).shards, strict=True
        ):
            assert (first.root / shard_a.file).read_bytes() == (again.root / shard_b.file).read_bytes()
    assert set(heldout_documents(other_seed, backend)) != set(held)

    by_fraction = prepare("d", seed=0, heldout={"fraction": 0.1})
    total = by_fraction.domains["prose"].train.tokens + by_fraction.domains["prose"].heldout.tokens
    assert by_fraction.domains["prose"].heldout.tokens >= int(np.ceil(0.1 * total))


def test_shards_split_at_the_size_limit_and_read_as_one_stream(tmp_path, tokenizer_dir):
    folder = write_text_domain(tmp_path / "prose", synthetic_documents(30, seed=5))
    config = DataConfig(domains={"prose": {"paths": [str(folder)]}}, tokenizer=tokenizer_dir)
    whole = prepare_data(config, tmp_path / "whole", quiet=True)
    sharded = prepare_data(config, tmp_path / "sharded", quiet=True, max_tokens_per_shard=97)
    shards = sharded.domains["prose"].train.shards
    assert len(shards) > 3 and all(s.tokens == 97 for s in shards[:-1])
    assert np.array_equal(stream(whole, "prose", "train"), stream(sharded, "prose", "train"))
    crossing = sharded.token_stream("prose", "train").read(90, 200)
    assert np.array_equal(crossing, stream(whole, "prose", "train")[90:200])


def test_same_fingerprint_skips_work_and_changed_input_redoes_it(tmp_path, tokenizer_dir, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_documents(20, seed=2))
    config = DataConfig(domains={"d": {"paths": [str(path)]}}, tokenizer=tokenizer_dir)
    first = prepare_data(config, tmp_path / "out", quiet=True)
    reweighted = DataConfig(domains={"d": {"paths": [str(path)], "weight": 5.0}}, tokenizer=tokenizer_dir)

    import upcycle.data.prepare as prepare_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenised again although nothing that shapes the shards changed")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module, "_prepare_domain", must_not_run)
        assert prepare_data(reweighted, tmp_path / "out", quiet=True).fingerprint == first.fingerprint
    write_jsonl(path, synthetic_documents(21, seed=2))
    changed = prepare_data(config, tmp_path / "out", quiet=True)
    assert changed.fingerprint != first.fingerprint
    assert load_manifest(tmp_path / "out").domains["d"].sources[0].documents == 21
