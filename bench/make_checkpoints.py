"""Random Llama-shaped Hugging Face checkpoints, written straight to safetensors, for benchmarks.

No transformers model is built: every tensor is drawn from a seeded generator and streamed to
disk with upcycle's `StreamingWriter`, so making a 1.1B checkpoint needs one tensor of memory
and about ten seconds. Each folder holds what a real HF Llama folder holds: `config.json`
(`model_type: llama`), `model.safetensors` and a tiny tokenizer (`tokenizer.json` built with
`tokenizers`, `tokenizer_config.json`, `special_tokens_map.json`) whose bytes are identical in
every folder, so that checks on tokenizer identity pass and `AutoTokenizer` loads it.

What is unusual, and why:
- Weights are random bf16 bit patterns, not `randn`: a 16-bit draw per weight, masked to a
  random sign, 7 random mantissa bits and an exponent of 2^-7 or 2^-6 (|w| in [0.0078, 0.031),
  std about 0.016, close to a trained 1B model's). `torch.randn` runs at ~65 M values/s on
  this machine, the bit mask at ~250 M/s; the values only have to be finite, distinct and
  seeded. Norm weights are 1 + the same noise.
- Each tensor has its own generator seeded by (seed, tensor index), so a tensor's values do not
  depend on which others were drawn before it.
- Folders are made under a staging name and renamed when complete, under a cache root outside
  the repository (`$UPCYCLE_BENCH_CACHE`, default `~/.cache/upcycle-bench`), keyed by shape,
  dtype and seed: a killed run never leaves a half checkpoint that a later run would trust.

Usage: python bench/make_checkpoints.py [--preset tinyllama-1.1b] [--count 3] [--root DIR]
prints the folders, one a line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from upcycle.checkpoint.safetensors_io import PlannedTensor, StreamingWriter

DEFAULT_ROOT = Path(os.environ.get("UPCYCLE_BENCH_CACHE", Path.home() / ".cache" / "upcycle-bench"))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


@dataclass(frozen=True)
class LlamaShape:
    """The dense Llama dimensions (D hidden, F FFN width, V vocabulary, H heads, Hk KV heads)."""

    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def key(self) -> str:
        tied = "-tied" if self.tied else ""
        return (
            f"v1-llama-L{self.layers}-D{self.hidden}-F{self.ffn}-V{self.vocab}"
            f"-H{self.heads}-Hk{self.kv_heads}{tied}"
        )


PRESETS = {
    # TinyLlama-1.1B: 1.100B parameters, 2.2 GB in bf16.
    "tinyllama-1.1b": LlamaShape(layers=22, hidden=2048, ffn=5632, vocab=32000, heads=32, kv_heads=4),
    # The same widths with 8 layers: 0.485B parameters; the largest tensors are the embedding
    # and the LM head, V × D = 65.5M parameters (131 MB in bf16).
    "llama-0.5b": LlamaShape(layers=8, hidden=2048, ffn=5632, vocab=32000, heads=32, kv_heads=4),
    "tiny": LlamaShape(layers=2, hidden=64, ffn=160, vocab=256, heads=4, kv_heads=2),
}


def tensor_shapes(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Llama checkpoint, in the order HF writes them."""
    D, F, V, Dh = shape.hidden, shape.ffn, shape.vocab, shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        shapes.update(
            {
                f"{prefix}.input_layernorm.weight": (D,),
                f"{prefix}.self_attn.q_proj.weight": (shape.heads * Dh, D),
                f"{prefix}.self_attn.k_proj.weight": (shape.kv_heads * Dh, D),
                f"{prefix}.self_attn.v_proj.weight": (shape.kv_heads * Dh, D),
                f"{prefix}.self_attn.o_proj.weight": (D, shape.heads * Dh),
                f"{prefix}.post_attention_layernorm.weight": (D,),
                f"{prefix}.mlp.gate_proj.weight": (F, D),
                f"{prefix}.mlp.up_proj.weight": (F, D),
                f"{prefix}.mlp.down_proj.weight": (D, F),
            }
        )
    shapes["model.norm.weight"] = (D,)
    if not shape.tied:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def parameter_count(shape: LlamaShape) -> int:
    return sum(math.prod(s) for s in tensor_shapes(shape).values())


def random_weights(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded random weights, |w| in [2^-7, 2^-5), built from random 16-bit patterns.

    bf16 bits: sign | 8 exponent | 7 mantissa. We keep a random sign, a random low exponent bit
    on top of 0x78 (2^-7) and 7 random mantissa bits. fp16 and fp32 are converted from that.
    """
    count = math.prod(shape)
    generator = torch.Generator().manual_seed(seed)
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(generator=generator)
    bits = words.view(torch.int16)[:count]
    sign = (bits & 0x0100) << 7  # a random bit moved into the sign position
    bits &= 0x00FF
    bits |= 0x3C00
    bits |= sign
    del sign
    weights = bits.view(torch.bfloat16).reshape(shape)
    return weights if dtype == torch.bfloat16 else weights.to(dtype)


def hf_config(shape: LlamaShape, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": shape.tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE over 256 bytes plus <unk>, <s>, </s> and no merges: tiny and valid.

    Callers copy the files of one folder to every checkpoint, so the bytes agree across sources.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(byte_alphabet):
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def shared_tokenizer(root: Path) -> Path:
    folder = root / "tokenizer"
    if not all((folder / name).is_file() for name in TOKENIZER_FILES):
        staging = root / f".tokenizer.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        write_tokenizer(staging)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(staging, folder)
    return folder


def write_checkpoint(
    folder: Path,
    shape: LlamaShape,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_from: Path | None = None,
    max_shard_bytes: int = 2**40,
) -> Path:
    """Write one random checkpoint into `folder` (created; must not exist). One file by default,
    as TinyLlama ships; a smaller `max_shard_bytes` gives shards and an index."""
    folder.mkdir(parents=True)
    shapes = tensor_shapes(shape)
    plan = [PlannedTensor(name, dtype, s) for name, s in shapes.items()]
    with StreamingWriter(folder, plan, max_shard_bytes) as writer:
        for index, (name, s) in enumerate(shapes.items()):
            tensor = random_weights(s, seed * 1_000_003 + index, dtype)
            if name.endswith("norm.weight"):
                tensor += 1
            writer.write(name, tensor)
    (folder / "config.json").write_text(json.dumps(hf_config(shape, dtype), indent=2) + "\n")
    tokenizer_from = tokenizer_from or shared_tokenizer(folder.parent)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_from / name, folder / name)
    return folder


def cached_checkpoints(
    shape: LlamaShape,
    count: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    root: Path = DEFAULT_ROOT,
    first_seed: int = 1,
) -> list[Path]:
    """`count` checkpoints of one shape with seeds first_seed, first_seed + 1, ...; made once and
    reused. A folder counts only when complete (it is renamed into place last)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = shared_tokenizer(root)
    dtype_name = str(dtype).removeprefix("torch.")
    folders = []
    for seed in range(first_seed, first_seed + count):
        folder = root / f"{shape.key()}-{dtype_name}-seed{seed}"
        if not (folder / "config.json").is_file():
            staging = root / f".{folder.name}.staging-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            write_checkpoint(staging, shape, seed, dtype, tokenizer_from=tokenizer)
            (staging / "shape.json").write_text(json.dumps(asdict(shape)) + "\n")
            os.rename(staging, folder)
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args()
    shape = PRESETS[args.preset]
    folders = cached_checkpoints(shape, args.count, dtype=getattr(torch, args.dtype), root=args.root)
    print(f"# {args.preset}: {parameter_count(shape) / 1e9:.3f}B parameters each", flush=True)
    for folder in folders:
        print(folder)


if __name__ == "__main__":
    main()
