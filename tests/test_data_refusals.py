"""Bad input is refused with one sentence naming the fix, and leaves no partial output."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from upcycle.data import DataConfig, HeldoutConfig, check_tokenizer_matches, load_manifest, prepare_data
from upcycle.data.synthetic import synthetic_documents, train_byte_level_bpe
from upcycle.errors import UpcycleError


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_byte_level_bpe(synthetic_documents(60, seed=9), 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def good_jsonl(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(10, seed=1)))
    return path


def config_for(tokenizer_dir: Path, *paths, **domain) -> DataConfig:
    return DataConfig(
        domains={"d": {"paths": [str(p) for p in paths], **domain}},
        tokenizer=tokenizer_dir,
        heldout={"fraction": 0.1},
    )


def refused(config: DataConfig, out_dir: Path, match: str) -> None:
    with pytest.raises(UpcycleError, match=match):
        prepare_data(config, out_dir, quiet=True)
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


def test_missing_paths(tmp_path, tokenizer_dir, good_jsonl):
    refused(
        config_for(tokenizer_dir, good_jsonl, tmp_path / "absent.jsonl"), tmp_path / "o", "does not exist"
    )
    refused(config_for(tokenizer_dir, tmp_path / "nothing-*.jsonl"), tmp_path / "o", "matches no file")
    (tmp_path / "empty_folder").mkdir()
    refused(config_for(tokenizer_dir, tmp_path / "empty_folder"), tmp_path / "o", "holds no")
    refused(config_for(tokenizer_dir, good_jsonl, tmp_path), tmp_path / "o", "reached twice")


def test_empty_domain_leaves_no_output(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": null}\n')
    refused(config_for(tokenizer_dir, empty), tmp_path / "o", "no non-empty documents")


def test_unknown_format(tmp_path, tokenizer_dir):
    table = tmp_path / "data.csv"
    table.write_text("text\nhello\n")
    refused(config_for(tokenizer_dir, table), tmp_path / "o", "set `format`")
    with pytest.raises(ValidationError, match="format"):
        config_for(tokenizer_dir, table, format="csv")


def test_malformed_records_name_file_and_line(tmp_path, tokenizer_dir):
    cases = {
        '{"text": "ok"}\n{"body": "x"}\n': r"bad.jsonl:2 has no field 'text'",
        '{"text": "ok"}\n{"text": \n': r"bad.jsonl:2 is not valid JSON",
        '{"text": 3}\n': "not a string",
        '["text"]\n': "not a JSON object",
    }
    for content, match in cases.items():
        (tmp_path / "bad.jsonl").write_text(content)
        refused(config_for(tokenizer_dir, tmp_path / "bad.jsonl"), tmp_path / "o", match)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    refused(config_for(tokenizer_dir, tmp_path / "latin1.txt"), tmp_path / "o", "not valid UTF-8")


def test_parquet_without_the_text_column(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    refused(config_for(tokenizer_dir, tmp_path / "t.parquet"), tmp_path / "o", "no column 'text'")


def test_tokenizer_problems(tmp_path, tokenizer_dir, good_jsonl):
    def config(tokenizer: Path, **options) -> DataConfig:
        return DataConfig(domains={"d": {"paths": [str(good_jsonl)]}}, tokenizer=tokenizer, **options)

    refused(config(tmp_path / "no_tok"), tmp_path / "o", "does not exist")
    (tmp_path / "not_a_tokenizer").mkdir()
    (tmp_path / "not_a_tokenizer" / "README").write_text("hi")
    refused(config(tmp_path / "not_a_tokenizer"), tmp_path / "o", "holds no tokenizer files")
    refused(config(tokenizer_dir, eos_token="</s>"), tmp_path / "o", "has no token '</s>'")
    refused(config(tokenizer_dir, add_bos=True), tmp_path / "o", "add_bos: false")


def test_manifest_from_another_tokenizer_is_refused(tmp_path, tokenizer_dir, good_jsonl):
    manifest = prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "out", quiet=True)
    copy = tmp_path / "model" / "tokenizer"
    shutil.copytree(tokenizer_dir, copy)
    check_tokenizer_matches(manifest, copy)  # same bytes elsewhere: accepted
    other = train_byte_level_bpe(synthetic_documents(60, seed=10), 300, tmp_path / "other")
    with pytest.raises(UpcycleError, match=r"re-run prepare_data with the model's tokenizer"):
        check_tokenizer_matches(manifest, other)


def test_config_reads_from_yaml_with_documented_defaults(tokenizer_dir):
    text = f"""
    tokenizer: {tokenizer_dir}
    domains:
      code: {{paths: [data/code/], format: jsonl, text_field: content, weight: 2.0}}
      math: {{paths: ["data/math/*.parquet"]}}
    heldout: {{tokens: 50000}}
    seed: 3
    """
    config = DataConfig.model_validate(yaml.safe_load(textwrap.dedent(text)))
    assert config.domains["math"].format == "auto" and config.domains["math"].text_field == "text"
    assert config.domains["code"].weight == 2.0 and config.heldout.target_tokens(10**6) == 50000
    assert DataConfig(domains={"d": {"paths": ["x"]}}, tokenizer=tokenizer_dir).heldout.fraction == 0.05
    assert HeldoutConfig(fraction=0.07).target_tokens(100) == 7  # decimal, not binary, rounding


def test_config_refusals(tokenizer_dir):
    with pytest.raises(ValidationError, match="not both"):
        DataConfig(
            domains={"d": {"paths": ["x"]}}, tokenizer=tokenizer_dir, heldout={"fraction": 0.1, "tokens": 5}
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataConfig(domains={"d": {"paths": ["x"], "weigth": 2}}, tokenizer=tokenizer_dir)
    with pytest.raises(ValidationError, match="rename it"):
        DataConfig(domains={"../d": {"paths": ["x"]}}, tokenizer=tokenizer_dir)
    with pytest.raises(ValidationError, match="positive `weight`"):
        DataConfig(domains={"d": {"paths": ["x"], "weight": 0}}, tokenizer=tokenizer_dir)


def test_heldout_that_takes_everything(tmp_path, tokenizer_dir, good_jsonl):
    config = DataConfig(
        domains={"d": {"paths": [str(good_jsonl)]}}, tokenizer=tokenizer_dir, heldout={"tokens": 10**9}
    )
    refused(config, tmp_path / "o", "lower `heldout`")


def test_out_dir_with_foreign_content_is_not_replaced(tmp_path, tokenizer_dir, good_jsonl):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("precious")
    with pytest.raises(UpcycleError, match="choose an empty or new folder"):
        prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "o", quiet=True)
    assert (tmp_path / "o" / "thesis.tex").read_text() == "precious"


def test_truncated_shard_is_refused_on_load(tmp_path, tokenizer_dir, good_jsonl):
    manifest = prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "out", quiet=True)
    shard = manifest.root / manifest.domains["d"].train.shards[0].file
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UpcycleError, match="re-run prepare_data"):
        load_manifest(tmp_path / "out")
    with pytest.raises(UpcycleError, match=r"no manifest\.json"):
        load_manifest(tmp_path)


def test_failure_midway_keeps_the_previous_output(tmp_path, tokenizer_dir, good_jsonl, monkeypatch):
    before = prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "out", quiet=True)
    bytes_before = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    good_jsonl.write_text(good_jsonl.read_text() + json.dumps({"text": "one more"}) + "\n")

    import upcycle.data.prepare as prepare_module

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare_module, "_write_splits", crash)
    with pytest.raises(UpcycleError, match=r"disk holding .* is full"):
        prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "out", quiet=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == bytes_before and load_manifest(tmp_path / "out").fingerprint == before.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "out"]


def test_filesystem_without_rename_is_refused_cleanly(tmp_path, tokenizer_dir, good_jsonl, monkeypatch):
    def no_rename(source, target):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "rename", no_rename)
    refused(config_for(tokenizer_dir, good_jsonl), tmp_path / "o", "supports rename")


def test_stale_staging_of_a_dead_run_is_removed_and_neighbours_survive(tmp_path, tokenizer_dir, good_jsonl):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.staging-{dead.pid}-0000abcd"
    alive = tmp_path / f".out.staging-{os.getpid()}-0000abcd"  # a live run's: keep
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "part.bin").write_bytes(np.arange(3, dtype=np.uint16).tobytes())
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / ".out.notes").write_text("keep me too")
    prepare_data(config_for(tokenizer_dir, good_jsonl), tmp_path / "out", quiet=True)
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "notes.txt").read_text() == (tmp_path / ".out.notes").read_text()[:7]
