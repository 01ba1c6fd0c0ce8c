"""Recipes: one file per method, all in one registry (`upcycle.recipes.registry.RECIPES`)."""

from upcycle.recipes import bam, btx, drop, nvidia, sparse  # noqa: F401  (each module registers its recipe)
from upcycle.recipes.registry import RECIPES, get_recipe

__all__ = ["RECIPES", "get_recipe"]
