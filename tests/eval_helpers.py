"""Helpers for the evaluation tests: a word-level tokenizer whose ids we choose, prepared data
whose domains use disjoint id ranges, and tiny native models that use that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import upcycle
from upcycle.data import DataConfig, Manifest, prepare_data
from upcycle.model.config import ModelConfig
from upcycle.model.init import init_weights

VOCAB = 64  # ids 0..3 are <pad>, <s>, </s> (EOS), <unk>; id i ≥ 4 is the word "w{i}"
DOMAIN_IDS = {"alpha": (4, 24), "beta": (24, 44)}  # disjoint id ranges: [low, high)


def word_tokenizer(folder: Path, vocab_size: int = VOCAB) -> Path:
    """A whitespace word-level tokenizer ("w17" -> id 17), saved as tokenizer.json + tokenizer_config.json."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return folder


def word_domains(
    root: Path,
    tokenizer_dir: Path,
    ranges: dict[str, tuple[int, int]] = DOMAIN_IDS,
    documents: int = 6,
    words: int = 200,
    seed: int = 0,
) -> Manifest:
    """Prepared data: domain d holds documents of random words with ids in `ranges[d]`.

    The held-out split is one document (≥ 150 tokens), so held-out windows of up to 150 input
    tokens never contain the EOS id that ends it.
    """
    rng = np.random.default_rng(seed)
    domains = {}
    for name, (low, high) in ranges.items():
        path = root / "raw" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(low, high, size=words))})
            for _ in range(documents)
        ]
        path.write_text("\n".join(lines) + "\n")
        domains[name] = {"paths": [str(path)]}
    config = DataConfig(domains=domains, tokenizer=tokenizer_dir, heldout={"tokens": 150}, num_workers=1)
    return prepare_data(config, root / "prepared", quiet=True)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=2,
        pad_token_id=0,
    )
    return ModelConfig(**{**fields, **overrides})


def tiny_native(folder: Path, tokenizer_dir: Path | None, seed: int = 0, **overrides) -> Path:
    """A random native model (std 0.2, so that its predictions are far from uniform)."""
    model = init_weights(upcycle.Transformer(tiny_config(**overrides)), std=0.2, seed=seed)
    return upcycle.save_native(model, folder, tokenizer_from=tokenizer_dir)


def heldout_tokens(prepared: Path, domain: str) -> np.ndarray:
    """A domain's held-out tokens read straight from the shard files named in manifest.json."""
    manifest = json.loads((prepared / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    shards = manifest["domains"][domain]["heldout"]["shards"]
    return np.concatenate([np.fromfile(prepared / shard["file"], dtype=dtype) for shard in shards]).astype(
        np.int64
    )


def no_grad_logits(model, ids: list[int] | np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]).logits[0].double()
