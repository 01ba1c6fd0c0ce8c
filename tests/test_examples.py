"""Every YAML under examples/ (and the packaged demo) validates against its config type."""

from __future__ import annotations

from pathlib import Path

import pytest

from upcycle.conversion import load_convert_config, recipe_params
from upcycle.model.config import ModelConfig
from upcycle.pipeline.config import PipelineConfig
from upcycle.pipeline.demo import demo_config
from upcycle.recipes import get_recipe
from upcycle.train import TrainConfig
from upcycle.yaml_config import load_yaml_model, read_yaml

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


SPECIAL = {"reproduce.yaml": "pipeline"}  # names fixed by the docs that cite them


def kind_of(path: Path) -> str:
    return SPECIAL.get(path.name) or path.name.split("-", 1)[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    kind = kind_of(path)
    if kind == "pipeline":
        load_yaml_model(path, PipelineConfig)
    elif kind == "train":
        load_yaml_model(path, TrainConfig)
    elif kind == "convert":
        config, where = load_convert_config(path)
        recipe_params(get_recipe(config.recipe), config, where)
    elif kind == "tiny":
        load_yaml_model(path, ModelConfig)
    else:
        pytest.fail(
            f"{path.name}: name it pipeline-*, train-*, convert-* or tiny-* so this test knows its type"
        )
    assert isinstance(read_yaml(path), dict)


def test_examples_exist_for_every_kind():
    assert {kind_of(p) for p in EXAMPLES} >= {"pipeline", "train", "convert"}


def test_packaged_demo_validates(tmp_path):
    assert demo_config(tmp_path).seq_len > 0
