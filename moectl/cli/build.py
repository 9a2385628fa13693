"""`moectl build`: parameters, FLOPs and memory of a recipe's model; optionally save it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, handle_errors, stdout_console


@handle_errors
def build(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    save: Path = typer.Option(None, "--save", help="Also write an initialised checkpoint to this folder "
                              "(model.safetensors + the resolved config.yaml). The folder must not exist."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    expert_parallel: int = typer.Option(1, "--expert-parallel", min=1, help="Also show the training memory of one "
                                        "process when every routed layer's experts are split this many ways over "
                                        "processes (expert parallelism); it must divide num_experts."),
) -> None:
    """Count a recipe's parameters (total and active per token), training FLOPs per token and training memory, without
    allocating the model."""
    from moectl.build import build_report, render, save_initial
    from moectl.errors import MoectlError
    from moectl.recipe.load import load_recipe

    rec = load_recipe(recipe, overrides or [])
    if save is not None and save.exists():
        raise MoectlError(f"{save} already exists", hint="choose a new folder for --save")
    report = build_report(rec, expert_parallel)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report, stdout_console())
    if save is not None:
        save_initial(rec, save)
        if not as_json:
            stdout_console().print(f"saved initialised model to {save}")
