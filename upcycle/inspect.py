"""`upcycle inspect`: what a checkpoint folder holds, read from headers only (no weights loaded
for safetensors)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from upcycle.checkpoint.loading import (
    load_config,
    match_tensors,
    read_config_json,
    read_state,
    tensor_renames,
)
from upcycle.checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsReader


def _tensor_rows(folder: Path, source) -> list[tuple[str, str, tuple[int, ...]]]:
    if isinstance(source, SafetensorsReader):
        return [(name, DTYPE_NAMES[e.dtype], e.shape) for name, e in source.entries.items()]
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in source.items()]


def format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def inspect_checkpoint(path: str | Path, show_tensors: bool = True, console: Console | None = None) -> None:
    folder = Path(path)
    console = console or Console()
    hf = read_config_json(folder)
    config = load_config(folder)
    source = read_state(folder)
    rows = _tensor_rows(folder, source)
    match_tensors(folder, config, tensor_renames(hf), {name: shape for name, _, shape in rows})
    total = sum(math.prod(shape) for _, _, shape in rows)

    summary = Table(title=f"{folder}", show_header=False)
    summary.add_column("field")
    summary.add_column("value")
    summary.add_row(
        "format", "upcycle native" if hf.get("model_type") == "upcycle" else f"HF {hf.get('model_type')}"
    )
    summary.add_row("architecture", config.architecture)
    summary.add_row("block", config.block)
    summary.add_row("layers", str(config.num_hidden_layers))
    summary.add_row("hidden / FFN", f"{config.hidden_size} / {config.intermediate_size}")
    summary.add_row(
        "heads / KV heads / head dim",
        f"{config.num_attention_heads} / {config.kv_heads} / {config.attention_head_dim}",
    )
    summary.add_row("vocabulary", str(config.vocab_size))
    summary.add_row("RoPE", f"{config.rope.type}, theta {config.rope.theta:g}")
    summary.add_row("tied embeddings", str(config.tie_word_embeddings))
    moe = getattr(config, "moe", None)
    if moe is not None:
        summary.add_row("MoE", f"{moe.num_experts} experts, top-{moe.top_k}, {moe.routing}")
    moa = getattr(config, "moa", None)
    if moa is not None:
        summary.add_row("attention experts", f"{moa.num_experts}, {moa.routing}, share_kv={moa.share_kv}")
    summary.add_row("parameters", f"{total:,} ({format_count(total)})")
    summary.add_row("tensors", str(len(rows)))
    console.print(summary)

    if show_tensors:
        table = Table(title="tensors")
        table.add_column("name")
        table.add_column("dtype")
        table.add_column("shape")
        table.add_column("parameters", justify="right")
        for name, dtype, shape in rows:
            table.add_row(name, dtype, "×".join(map(str, shape)) or "scalar", f"{math.prod(shape):,}")
        console.print(table)
