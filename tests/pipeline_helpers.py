"""A reduced pipeline that runs every stage in seconds (tiny corpus, tiny model, few steps)."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = {
    "architecture": "llama",
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
    "bos_token_id": 1,
    "pad_token_id": 2,
}


def reduced_pipeline(output: Path, **overrides) -> dict:
    train = {"lr": 3e-3, "warmup_steps": 2, "global_batch_size": 4}
    config = {
        "output": str(output),
        "seq_len": 32,
        "heldout_fraction": 0.1,
        "corpus": {
            "domains": ["code", "math"],
            "bytes_per_domain": 40_000,
            "vocab_size": 512,
            "download": False,
        },
        "seed": {"config": TINY_MODEL, "steps": 6, "train": train},
        "branches": {"steps": 4, "train": train},
        "mixes": [
            {"name": "btx", "recipe": "btx"},
            {"name": "bam", "recipe": "bam", "attention": {"share_kv": True}},
            {"name": "sparse", "recipe": "sparse", "num_experts": 2},
            {"name": "dense", "recipe": "dense"},
            {"name": "btm", "recipe": "btm", "top_k": 1},
        ],
        "finetune": {"steps": 3, "train": {**train, "checkpoint_every_steps": 1}},
        "eval": {"max_sequences": 4, "batch_size": 4},
    }
    config.update(overrides)
    return config
