"""`upcycle recipes`: each recipe with its paper and typed parameters (defaults, descriptions)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from upcycle.recipes import RECIPES, get_recipe


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return str(value.model_dump() if hasattr(value, "model_dump") else value)
    return "required" if field.is_required() else repr(field.default)


def describe_recipes(name: str | None = None, console: Console | None = None) -> None:
    console = console or Console()
    if name is None:
        table = Table(title="recipes")
        for column in ("name", "what it does", "paper", "sources"):
            table.add_column(column)
        for recipe in sorted(RECIPES.values(), key=lambda r: r.name):
            count = "1" if recipe.max_sources == 1 else f"≥ {recipe.min_sources}"
            table.add_row(recipe.name, recipe.summary, recipe.paper, count)
        console.print(table)
        console.print("`upcycle recipes NAME` lists a recipe's parameters.")
        return
    recipe = get_recipe(name)
    table = Table(title=f"{recipe.name}: {recipe.summary}\n{recipe.paper}")
    for column in ("parameter", "type", "default", "meaning"):
        table.add_column(column)
    for key, field in recipe.Params.model_fields.items():
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation).replace(
            "typing.", ""
        )
        table.add_row(key, annotation, _default(field), field.description or "")
    console.print(table)
