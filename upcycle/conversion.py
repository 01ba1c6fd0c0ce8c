"""`upcycle.convert(config, out_dir)`: validate everything, then run a recipe through the engine.

Validation happens before any output exists: the YAML and the recipe's typed parameters, the
number of sources, that every source exists and is a supported dense checkpoint whose tensors
match its config, that all sources share architecture, shapes and tokenizer, the recipe's own
constraints, that the output format can hold the result, and that the disk has room.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from upcycle.checkpoint.atomic import write_refusal
from upcycle.checkpoint.convert import write_converted
from upcycle.checkpoint.export import get_export
from upcycle.errors import UpcycleError, describe_validation_error, validated
from upcycle.model.config import ModelConfig
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
# The model config names the MoE keys by their place in the model (`moe.top_k`); a convert YAML
# spells them as top-level keys (`top_k`, `moe_layers`): messages name the key the user writes.
_MOE_KEY = re.compile(
    r"\bmoe\.(top_k|num_experts|routing|renormalize|granularity|capacity_factor|aux_loss_coef|"
    r"z_loss_coef|aux_loss|layers)\b"
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


def as_convert_keys(message: str) -> str:
    """`moe.top_k` -> `top_k`, `moe.layers` -> `moe_layers`: the convert YAML's spelling."""
    return _MOE_KEY.sub(lambda match: "moe_layers" if match[1] == "layers" else match[1], message)


def make_recipe(recipe_cls: type, params: Any, sources: list, where: str) -> Any:
    """The recipe over `sources`, its target model config and its own constraints checked."""
    try:
        recipe = recipe_cls(params, sources)
    except ValueError as error:  # the target ModelConfig refused a combination (pydantic)
        raise UpcycleError(as_convert_keys(describe_validation_error(error, where))) from error
    recipe.validate()
    return recipe


def check_convert_config(config: dict, source_configs: list[ModelConfig], where: str) -> None:
    """The checks of `convert` that need only the sources' model configs (no tensor is read,
    nothing is written): the keys, the recipe's parameters, the number of sources, the target
    model config and the recipe's constraints. `upcycle run` checks every mix this way before
    its first stage."""
    sources = [f"source {i}" for i in range(len(source_configs))]
    convert_config = validated(ConvertConfig, {**config, "sources": sources}, where)
    recipe_cls = get_recipe(convert_config.recipe)
    params = recipe_params(recipe_cls, convert_config, where)
    check_source_count(recipe_cls, len(source_configs))
    stand_ins = [
        SimpleNamespace(folder=Path(name), config=c) for name, c in zip(sources, source_configs, strict=True)
    ]
    make_recipe(recipe_cls, params, stand_ins, where)


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
    recipe = make_recipe(recipe_cls, params, sources, where)
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
