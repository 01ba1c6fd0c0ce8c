"""`DataConfig`: what to tokenise, with which tokenizer, and how to split it.

A config describes *preparation* only: which files make each domain, the tokenizer, the held-out
split and the document separators. Two things people expect here live elsewhere, on purpose:

- `seq_len` belongs to training (`TrainBatches`, `HeldoutBatches`). Shards are a flat token
  stream per domain and windows are cut when reading, so one prepared folder serves any
  sequence length.
- A domain's `weight` is recorded in the manifest as the default mixture weight, but it does
  not change the shards and is not part of the fingerprint; training may override it.

Relative paths are resolved against the current working directory when `prepare_data` runs.
Validation happens at construction: a bad value raises pydantic's `ValidationError` naming the
field and the fix, like every other config in upcycle.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from upcycle.model.config import StrictModel

SourceFormat = Literal["auto", "text", "jsonl", "parquet"]

# Domain names become folder names inside the prepared output, so they are kept path-safe.
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _StrictModel(StrictModel):
    """Unknown keys are refused, assignments are validated and number fields refuse booleans,
    as in `upcycle.model.config`."""


class DomainConfig(_StrictModel):
    """One named domain: its source files, how to read them, and its default mixture weight.

    `paths`: files, folders (searched recursively, hidden entries skipped, sorted by path) or glob
    patterns; their order fixes the order of documents. `format`: `auto` picks by file extension
    (`.txt`/`.text`/`.md` → text, `.jsonl`/`.ndjson` → jsonl, `.parquet`/`.pq` → parquet).
    A text file is ONE document (its exact UTF-8 content); put many documents per file in JSONL
    or Parquet. `text_field`: the JSONL key or Parquet column holding the document text.
    """

    paths: list[str] = Field(min_length=1)
    format: SourceFormat = "auto"
    text_field: str = Field("text", min_length=1)
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)


class HeldoutConfig(_StrictModel):
    """Size of each domain's held-out split: `fraction` of its tokens, or at least `tokens` tokens.

    Held-out documents are whole documents chosen by a seeded shuffle, so the split holds at
    least the requested amount and less than that plus one document. Zero disables the split.
    """

    fraction: float | None = Field(None, ge=0, lt=1)
    tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> HeldoutConfig:
        if self.fraction is not None and self.tokens is not None:
            raise ValueError("heldout: set either `fraction` or `tokens`, not both")
        if self.fraction is None and self.tokens is None:
            raise ValueError("heldout: set `fraction` (e.g. 0.05) or `tokens` (e.g. 100000)")
        return self

    def target_tokens(self, total_tokens: int) -> int:
        """Held-out tokens asked for in a domain of `total_tokens` tokens."""
        if self.tokens is not None:
            return self.tokens
        # The fraction as the decimal the user wrote, so 0.07 of 100 tokens is 7, not 8.
        return math.ceil(Fraction(repr(self.fraction)) * total_tokens)


class DataConfig(_StrictModel):
    """Everything `prepare_data` needs.

    `tokenizer`: a tokenizer folder (with `tokenizer.json`, or anything `transformers` can load
    as a fast tokenizer from local files) or a `tokenizer.json` file.
    `eos_token`: the token written after every document; `None` takes the tokenizer's own
    end-of-text token (`eos_token` in `tokenizer_config.json`, else a well-known name).
    `add_bos`: also write the tokenizer's BOS token before every document (Llama-style models).
    `seed`: fixes the held-out choice (and is the default seed of training samplers).
    `num_workers`: threads for the Rust tokenizer; `None` uses every core, 1 tokenises serially.
    """

    domains: dict[str, DomainConfig] = Field(min_length=1)
    tokenizer: Path
    heldout: HeldoutConfig = Field(default_factory=lambda: HeldoutConfig(fraction=0.05))
    seed: int = Field(0, ge=0)
    eos_token: str | None = None
    add_bos: bool = False
    num_workers: int | None = Field(None, ge=1)

    @field_validator("domains")
    @classmethod
    def _domain_names_are_path_safe(cls, domains: dict[str, DomainConfig]) -> dict[str, DomainConfig]:
        for name in domains:
            if not _DOMAIN_NAME.match(name):
                raise ValueError(
                    f"domain name {name!r} must start with a letter or digit and use only letters, "
                    "digits, '_', '-' and '.'; rename it"
                )
        return domains

    @model_validator(mode="after")
    def _some_weight(self) -> DataConfig:
        if sum(domain.weight for domain in self.domains.values()) <= 0:
            raise ValueError("domains: at least one domain needs a positive `weight`")
        return self
