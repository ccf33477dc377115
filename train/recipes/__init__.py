"""The recipes by name: one module per method trained on a feature store, each with the same interface

    NAME                    its name here: what `avcache train --recipe`, a grid's `recipe:` and RUN/recipe.json say
    RecipeConfig            its config dataclass (train/configs/<NAME>*.yaml are instances of it)
    load_recipe_config(path=None, overrides=()) -> RecipeConfig   (checked: a bad value is a ConfigError)
    main(store, run, config=None, overrides=(), log=print) -> results, also written to RUN/results.json
    HEADLINE                its headline metrics: `Headline`s naming results.json keys and their baselines' keys

`recipe(name)` is how every caller (CLI, demo, ablations, report) finds one.
"""
from __future__ import annotations

from types import ModuleType

from avcache.pipeline.config import ConfigError
from avcache.train.recipes import avsd, bgtai, brewclip, ser

RECIPES: dict[str, ModuleType] = {module.NAME: module for module in (brewclip, ser, bgtai, avsd)}


class UnknownRecipeError(ConfigError):
    pass


def recipe(name: str) -> ModuleType:
    try:
        return RECIPES[name]
    except (KeyError, TypeError):  # TypeError: a name that is not even a string (a grid's `recipe: [a, b]`)
        raise UnknownRecipeError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})") from None
