"""The one registry of recipes: name -> recipe class. Adding a recipe is one new file that
decorates its class with `@register`, plus its import line in `upcycle/recipes/__init__.py`."""

from __future__ import annotations

from upcycle.errors import UpcycleError

RECIPES: dict[str, type] = {}


def register(recipe_class: type) -> type:
    if recipe_class.name in RECIPES:
        raise ValueError(f"recipe {recipe_class.name!r} registered twice")
    RECIPES[recipe_class.name] = recipe_class
    return recipe_class


def get_recipe(name: str) -> type:
    if name not in RECIPES:
        raise UpcycleError(f"unknown recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
