"""Saving and loading model weights and run state."""

from __future__ import annotations

from pathlib import Path

from moectl.fsutil import atomic_dir
from moectl.recipe.load import dump_recipe
from moectl.recipe.schema import Recipe


def save_initial(recipe: Recipe, target: Path) -> None:
    """An initialised model (from the recipe's seed) and its resolved recipe, written atomically."""
    from safetensors.torch import save_model

    from moectl.factory import build_model

    model = build_model(recipe)
    with atomic_dir(Path(target)) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_recipe(recipe))
