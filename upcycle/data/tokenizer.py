"""Load a Hugging Face tokenizer for data preparation, identify it by hash, pick its separators.

Unusual choices, and why:
- Tokenisation always runs on the Rust `tokenizers.Tokenizer` (from `tokenizer.json`, or the
  `backend_tokenizer` of a tokenizer that `transformers` loads from local files), because its
  `encode_batch_fast` is parallel over all cores without Python worker processes.
- `encode_special_tokens` is switched on: a document that contains the literal text
  `<|endoftext|>` is tokenised as that text, not as the EOS id. The EOS id then appears in the
  shards only where we put it, between documents, and nobody can inject a document boundary.
- The tokenizer hash covers the files that define text → ids: `tokenizer.json` alone when it
  exists (it is the complete definition we tokenise with), otherwise the slow-tokenizer files.
  `tokenizer_config.json` is left out next to a `tokenizer.json` so that editing a chat template
  or `model_max_length` does not orphan prepared data. Each file enters the hash as its name,
  its length and its bytes, in name order, so the hash is the same wherever the folder lives.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from upcycle.errors import UpcycleError

if TYPE_CHECKING:
    from upcycle.data.manifest import Manifest

_SLOW_TOKENIZER_FILES = (
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
# Used only when neither the config nor tokenizer_config.json names the token; first match wins.
_WELL_KNOWN_EOS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
_WELL_KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


@dataclass
class DataTokenizer:
    """A loaded tokenizer with the facts that data preparation records in the manifest."""

    backend: Tokenizer
    path: Path
    sha256: str
    id_upper_bound: int  # every token id is < this; decides the shard dtype
    eos_token: str
    eos_id: int
    bos_token: str | None
    bos_id: int | None

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.id_upper_bound)


def token_dtype(id_upper_bound: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (half the disk and page cache), else uint32."""
    if id_upper_bound <= 2**16:
        return np.dtype(np.uint16)
    if id_upper_bound <= 2**32:
        return np.dtype(np.uint32)
    raise UpcycleError(f"a vocabulary of {id_upper_bound} ids does not fit in 32 bits; use a smaller one")


def tokenizer_files(path: Path) -> list[Path]:
    """The files whose bytes identify the tokenizer at `path` (a folder or a tokenizer.json)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UpcycleError(f"tokenizer path {path} does not exist; point `tokenizer` at a tokenizer folder")
    if (path / "tokenizer.json").is_file():
        return [path / "tokenizer.json"]
    files = [path / name for name in _SLOW_TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise UpcycleError(
            f"{path} holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
            "point `tokenizer` at the model's tokenizer folder"
        )
    return files


def tokenizer_sha256(path: Path) -> str:
    """sha256 over the tokenizer's files: name, length and bytes of each, in name order."""
    digest = hashlib.sha256()
    files = tokenizer_files(path)
    # A lone tokenizer.json file, whatever its name, hashes like the same file inside a folder.
    names = ["tokenizer.json"] if len(files) == 1 and Path(path).is_file() else [f.name for f in files]
    for name, file in sorted(zip(names, files, strict=True)):
        data = file.read_bytes()
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def load_tokenizer(path: Path, eos_token: str | None = None, need_bos: bool = False) -> DataTokenizer:
    """Load the tokenizer at `path` and resolve its EOS (and BOS when `need_bos`) tokens."""
    path = Path(path)
    files = tokenizer_files(path)
    backend, declared = _load_backend(path, files)
    backend.encode_special_tokens = True
    eos = _resolve_special(
        backend,
        eos_token or declared.get("eos_token"),
        _WELL_KNOWN_EOS,
        path,
        fix="set `eos_token` in the data config to one of its tokens",
    )
    bos_id = bos = None
    if need_bos:
        bos = _resolve_special(
            backend, declared.get("bos_token"), _WELL_KNOWN_BOS, path, fix="set `add_bos: false`"
        )
        bos_id = backend.token_to_id(bos)
    id_upper_bound = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    return DataTokenizer(
        backend=backend,
        path=path.resolve(),
        sha256=tokenizer_sha256(path),
        id_upper_bound=id_upper_bound,
        eos_token=eos,
        eos_id=backend.token_to_id(eos),
        bos_token=bos,
        bos_id=bos_id,
    )


def check_tokenizer_matches(manifest: Manifest, tokenizer_dir: Path) -> None:
    """Refuse when the data in `manifest` was tokenised with another tokenizer than `tokenizer_dir`."""
    found = tokenizer_sha256(Path(tokenizer_dir))
    if found != manifest.tokenizer.sha256:
        raise UpcycleError(
            f"the data in {manifest.root} was tokenized with tokenizer {manifest.tokenizer.sha256[:12]} "
            f"but {tokenizer_dir} is tokenizer {found[:12]}; re-run prepare_data with the model's tokenizer"
        )


def _load_backend(path: Path, files: list[Path]) -> tuple[Tokenizer, dict]:
    """The Rust tokenizer and the special tokens its config declares (`eos_token`, `bos_token`)."""
    if path.is_file() or files[0].name == "tokenizer.json":
        try:
            backend = Tokenizer.from_file(str(files[0]))
        except Exception as error:  # the Rust error names the problem; keep it in one sentence
            raise UpcycleError(
                f"cannot read tokenizer {files[0]} ({error}); point at a valid tokenizer.json"
            ) from None
        return backend, _declared_special_tokens(path) if path.is_dir() else {}
    return _load_through_transformers(path)


def _load_through_transformers(path: Path) -> tuple[Tokenizer, dict]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise UpcycleError(
            f"transformers cannot load the tokenizer in {path} ({error}); fix the folder"
        ) from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise UpcycleError(
            f"the tokenizer in {path} has no fast (Rust) form; save it with tokenizer.json "
            "(`AutoTokenizer.from_pretrained(...).save_pretrained(...)` with tokenizers installed)"
        )
    declared = {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token}
    return backend, {key: value for key, value in declared.items() if value}


def _declared_special_tokens(folder: Path) -> dict:
    declared: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        file = folder / name
        if file.is_file():
            content = json.loads(file.read_text(encoding="utf-8"))
            for key in ("eos_token", "bos_token"):
                value = content.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    declared[key] = value
    return declared


def _resolve_special(
    backend: Tokenizer, wanted: str | None, well_known: tuple[str, ...], path: Path, fix: str
) -> str:
    """`wanted` if the vocabulary has it, else the first well-known special token present."""
    if wanted is not None:
        if backend.token_to_id(wanted) is None:
            raise UpcycleError(f"the tokenizer in {path} has no token {wanted!r}; {fix}")
        return wanted
    specials = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
    for candidate in well_known:
        if candidate in specials:
            return candidate
    raise UpcycleError(f"the tokenizer in {path} declares none of {', '.join(well_known)}; {fix}")
