"""Every recipe is found by name in the registry and has the same interface (NAME, RecipeConfig,
load_recipe_config, main, HEADLINE); every shipped config loads through its recipe's load_recipe_config; an
unknown name is a clear error; a run records its recipe and its results hold the HEADLINE keys."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from avcache.pipeline.config import ConfigError
from avcache.train.recipes import RECIPES, UnknownRecipeError, recipe
from avcache.train.runs import Headline, read_recipe

CONFIG_DIR = Path(__file__).resolve().parent.parent / "train" / "configs"
RECIPE_DIR = Path(__file__).resolve().parent.parent / "train" / "recipes"
MAIN_PARAMETERS = [("store", inspect.Parameter.empty), ("run", inspect.Parameter.empty), ("config", None),
                   ("overrides", ()), ("log", print)]


def test_the_registry_holds_every_recipe_module():
    modules = sorted(p.stem for p in RECIPE_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert sorted(RECIPES) == modules == ["avsd", "bgtai", "brewclip", "ser"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_has_the_same_interface(name):
    module = recipe(name)
    assert module.NAME == name and module.__name__ == f"avcache.train.recipes.{name}"
    assert dataclasses.is_dataclass(module.RecipeConfig)
    default = module.load_recipe_config()
    assert isinstance(default, module.RecipeConfig)
    assert [(p.name, p.default) for p in inspect.signature(module.load_recipe_config).parameters.values()] == [
        ("path", None), ("overrides", ())]
    assert [(p.name, p.default) for p in inspect.signature(module.main).parameters.values()] == MAIN_PARAMETERS
    assert isinstance(module.HEADLINE, tuple) and module.HEADLINE
    for headline in module.HEADLINE:
        assert isinstance(headline, Headline) and isinstance(headline.metric, str)
        assert all(key is None or isinstance(key, str) and key != headline.metric
                   for key in (headline.untrained, headline.trivial))
        assert headline.trivial, f"{name}: {headline.metric} stands beside no trivial predictor"


@pytest.mark.parametrize("config", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_through_its_recipe(config):
    module = recipe(config.stem.split("_")[0])  # train/configs/<recipe>[_<variant>].yaml
    cfg = module.load_recipe_config(config)
    assert isinstance(cfg, module.RecipeConfig)
    assert module.load_recipe_config(config, ["seed=7"]).seed == 7  # overrides apply on top of the file


@pytest.mark.parametrize("name, key, value", [("ser", "train.finetune", "everything"),
                                              ("avsd", "data.cues", "smell"),
                                              ("bgtai", "data.source", "video")])
def test_a_bad_value_is_refused_when_the_config_loads(name, key, value):
    with pytest.raises(ConfigError, match=key):  # before any data loads, and in an ablation's plan
        recipe(name).load_recipe_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("name", ["nope", "", None, ["brewclip"], "train-retrieval"])
def test_an_unknown_recipe_names_the_known_ones(name):
    with pytest.raises(UnknownRecipeError) as refused:
        recipe(name)
    assert str(refused.value) == f"unknown recipe {name!r} (known: brewclip, ser, bgtai, avsd)"
    assert isinstance(refused.value, ConfigError)  # the CLI prints it as one line, exit code 2


def test_a_run_records_its_recipe_and_its_results_hold_the_headline_keys(tmp_path, torch_one_thread):
    from avcache.eval.train_bench import write_planted_store

    store = write_planted_store(tmp_path, images=12, clip_dim=16, whisper_dim=16, seconds=(0.1, 0.2))
    brewclip = recipe("brewclip")
    brewclip.main(store, tmp_path / "run", None, ["train.epochs=1", "train.batch_size=8", "model.width=16",
                                                            "model.ffn=32", "model.heads=2"], log=lambda *a: None)
    assert read_recipe(tmp_path / "run") == "brewclip"
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    for headline in brewclip.HEADLINE:
        assert {key for key in headline if key} <= set(written), headline  # the metric and each baseline's key
