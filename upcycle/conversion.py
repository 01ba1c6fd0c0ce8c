"""`upcycle.convert(config, out_dir)`: validate everything, then run a recipe through the engine.

Validation happens before any output exists: the YAML and the recipe's typed parameters, the
number of sources, that every source exists and is a supported dense checkpoint whose tensors
match its config, that all sources share architecture, shapes and tokenizer, the recipe's own
constraints, that the output format can hold the result, and that the disk has room.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from upcycle.checkpoint.atomic import write_refusal
from upcycle.checkpoint.convert import write_converted
from upcycle.checkpoint.export import get_export
from upcycle.errors import UpcycleError, describe_validation_error, validated
from upcycle.recipes import get_recipe
from upcycle.recipes.base import ConvertConfig, SourceModel
from upcycle.yaml_config import read_yaml

# Dense fields that must agree between sources mixed into one model.
MUST_MATCH = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_heads",
    "attention_head_dim",
    "hidden_act",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "qk_norm",
    "tie_word_embeddings",
    "block",
    "rope",
    "sliding_window",
)
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def load_convert_config(config: ConvertConfig | dict | str | Path) -> tuple[ConvertConfig, str]:
    if isinstance(config, ConvertConfig):
        return config, "convert config"
    where = "convert config" if isinstance(config, dict) else str(config)
    data = config if isinstance(config, dict) else read_yaml(config)
    return validated(ConvertConfig, data, where), where


def recipe_params(recipe_cls: type, config: ConvertConfig, where: str) -> Any:
    from pydantic import ValidationError

    given = config.recipe_parameters()
    unknown = sorted(set(given) - set(recipe_cls.Params.model_fields))
    if unknown:
        raise UpcycleError(
            f"{where}: {unknown[0]} is not a parameter of recipe {recipe_cls.name}; remove it "
            f"(its parameters: {', '.join(recipe_cls.Params.model_fields)})"
        )
    try:
        return recipe_cls.Params.model_validate(given)
    except ValidationError as error:
        raise UpcycleError(describe_validation_error(error, where)) from error


def check_source_count(recipe_cls: type, count: int) -> None:
    low, high = recipe_cls.min_sources, recipe_cls.max_sources
    if count < low or (high is not None and count > high):
        wanted = (
            f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        )
        raise UpcycleError(f"recipe {recipe_cls.name} takes {wanted} source(s), got {count}; fix `sources`")


def check_compatible(sources: list[SourceModel]) -> None:
    first = sources[0]
    for source in sources:
        if source.config.moe is not None or source.config.moa is not None:
            raise UpcycleError(
                f"source {source.folder} is already a mixture model; give dense source checkpoints"
            )
    for other in sources[1:]:
        for field in MUST_MATCH:
            mine, theirs = getattr(first.config, field), getattr(other.config, field)
            if mine != theirs:
                raise UpcycleError(
                    f"sources differ in {field}: {first.folder} has {mine}, {other.folder} has {theirs}; "
                    "mix only models branched from one seed"
                )
        if first.tokenizer_sha256 != other.tokenizer_sha256:
            raise UpcycleError(
                f"sources {first.folder} and {other.folder} have different tokenizer files; "
                "mix only models that share one tokenizer"
            )


def convert(
    config: ConvertConfig | dict | str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    quiet: bool = True,
) -> Path:
    """Convert dense source checkpoints into one MoE checkpoint as the config says."""
    convert_config, where = load_convert_config(config)
    recipe_cls = get_recipe(convert_config.recipe)
    params = recipe_params(recipe_cls, convert_config, where)
    check_source_count(recipe_cls, len(convert_config.sources))
    sources = [SourceModel.open(path) for path in convert_config.sources]
    check_compatible(sources)
    try:
        recipe = recipe_cls(params, sources)
    except ValueError as error:  # the target ModelConfig refused a combination (pydantic)
        raise UpcycleError(describe_validation_error(error, where)) from error
    recipe.validate()
    export = get_export(convert_config.output.format)
    dtype = (
        sources[0].dtype() if convert_config.output.dtype == "auto" else DTYPES[convert_config.output.dtype]
    )
    try:
        return write_converted(
            recipe.target,
            recipe.build,
            export,
            out_dir,
            dtype=dtype,
            max_shard_bytes=convert_config.output.shard_size_mb * 1024**2,
            tokenizer_from=sources[0].folder,
            recipe_yaml=convert_config.model_dump(mode="json"),
            model_card=model_card(recipe, convert_config),
            overwrite=overwrite,
            quiet=quiet,
        )
    except OSError as error:  # a full disk, a filesystem without renames: one sentence
        refusal = write_refusal(error, out_dir)
        if refusal is None:
            raise
        raise refusal from error


def model_card(recipe, config: ConvertConfig) -> str:
    moe = recipe.target.moe
    lines = [
        f"Made by upcycle with the `{recipe.name}` recipe: {recipe.summary}.",
        "",
        f"- paper: {recipe.paper}",
        f"- sources: {', '.join(config.sources)}",
        f"- experts: {moe.num_experts}, routing {moe.routing}"
        + (f", top-{moe.top_k}" if moe.top_k else "")
        + f", MoE layers: {moe.layers}",
        f"- parameters: {recipe.params.model_dump(mode='json')}",
        f"- output format: {config.output.format}",
        "",
        "The full recipe is in `upcycle_recipe.yaml`. Load with `upcycle.load_model(PATH)`, or with",
        "`transformers.AutoModelForCausalLM.from_pretrained(PATH)` (after `import upcycle` for the",
        "native format).",
    ]
    return "\n".join(lines)
