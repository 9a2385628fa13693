"""`moectl recipes list | show | validate | schema`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, fail, handle_errors, stdout_console

app = typer.Typer(help="List, show and validate recipes; emit their JSON Schema.", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_recipes() -> None:
    """List the shipped recipes with their descriptions."""
    import yaml
    from rich.table import Table

    from moectl.recipe.load import shipped_dir, shipped_name, shipped_recipes

    table = Table(title=f"shipped recipes ({shipped_dir()})", title_justify="left")
    table.add_column("name", no_wrap=True, overflow="fold")   # names are what users type: never cut
    table.add_column("description")
    for path in shipped_recipes():
        try:
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "[red](invalid YAML)[/]"
        table.add_row(shipped_name(path), str(desc).strip())
    stdout_console().print(table)


@app.command("show")
@handle_errors
def show(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
) -> None:
    """Print the fully resolved recipe: `extends` merged, overrides applied, defaults filled in."""
    from moectl.recipe.load import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, overrides or [])), nl=False)


@app.command("validate")
@handle_errors
def validate(
    args: list[str] = typer.Argument(None, help="Recipes to check, then optional dotted.key=value "
                                     "overrides applied to each. With none, every shipped recipe.",
                                     show_default=False),
) -> None:
    """Check recipes and report every problem. Exit code 2 if any recipe is invalid."""
    from moectl.errors import MoectlError
    from moectl.recipe.load import load_recipe, shipped_recipes

    args = args or []
    overrides = [a for a in args if "=" in a and not Path(a).exists()]
    refs = [a for a in args if a not in overrides] or [str(p) for p in shipped_recipes()]
    console = stdout_console()
    failures: list[MoectlError] = []
    for ref in refs:
        try:
            load_recipe(ref, overrides)
            console.print(f"[green]ok[/]  {ref}")
        except MoectlError as e:
            console.print(f"[red]bad[/] {ref}")
            failures.append(e)
    if failures:
        from moectl.cli.common import stderr_console

        for e in failures[:-1]:
            stderr_console().print(e.render(), style="red", markup=False)
        fail(failures[-1])


@app.command("schema")
@handle_errors
def schema(
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
    fmt: str = typer.Option("json", "--format", help="'json' (JSON Schema, for editors and validators) "
                            "or 'markdown' (the human reference in docs/recipe-reference.md)."),
    plugins: list[str] = typer.Option(None, "--plugin", help="Also import this plugin module (repeatable), so "
                                      "the routers and block kinds it registers are in the schema.",
                                      show_default=False),
) -> None:
    """Emit the recipe JSON Schema (for editor completion and validation)."""
    from moectl.errors import MoectlError
    from moectl.recipe.plugins import load_plugins

    load_plugins(list(plugins or []), source="--plugin")

    if fmt == "json":
        from moectl.recipe.jsonschema import recipe_json_schema

        text = json.dumps(recipe_json_schema(), indent=2) + "\n"
    elif fmt == "markdown":
        from moectl.recipe.reference import markdown_reference

        text = markdown_reference()
    else:
        raise MoectlError(f"unknown --format {fmt!r}", hint="use json or markdown")
    if output is None:
        typer.echo(text, nl=False)
    else:
        from moectl.fsutil import atomic_write_text

        if output.is_dir():
            raise MoectlError(f"{output} is a folder", hint="give -o a file name, e.g. recipe.schema.json")
        atomic_write_text(output, text)
        typer.echo(f"wrote {output}")
