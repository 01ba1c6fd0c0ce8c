"""Reading YAML config files into typed configs, with one-sentence refusals."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel

from upcycle.errors import UpcycleError, validated

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def read_yaml(path: str | Path) -> object:
    file = Path(path)
    if not file.is_file():
        raise UpcycleError(f"config file {file} does not exist; check the path")
    try:
        return yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UpcycleError(f"{file} is not valid YAML{where}; fix the syntax") from error
    except UnicodeDecodeError as error:
        raise UpcycleError(f"{file} is not a UTF-8 text file; give a YAML config") from error


def load_yaml_model(path: str | Path, model_cls: type[ConfigT]) -> ConfigT:
    """Parse `path` and validate it into `model_cls`."""
    return validated(model_cls, read_yaml(path), str(path))
