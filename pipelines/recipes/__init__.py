"""Pipeline recipes: named, partial job specs in YAML (everything but the source and job id).

`curate run --recipe demo` starts from pipelines/recipes/demo.yaml; a path to a .yaml file works
too. Flags given on the command line override the recipe's values, field by field.
"""

from pathlib import Path
from typing import Any

import yaml

from schemas.errors import InputError

RECIPES_DIR = Path(__file__).parent


class RecipeError(InputError, ValueError):
    """A recipe that does not exist or is not a YAML mapping."""

    code = "recipe_invalid"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """The recipe's fields: a built-in name or a path to a YAML file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"no recipe {name!r}: use one of {', '.join(recipe_names())} or a path to a .yaml file"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of job-spec fields")
    for key in ("source", "job_id"):
        if key in data:
            raise RecipeError(
                f"recipe {path} sets {key!r}: that belongs to the run, not the recipe"
            )
    return data


def merge(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe with `overrides` laid over it; nested option groups merge field by field."""
    merged = dict(recipe)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
