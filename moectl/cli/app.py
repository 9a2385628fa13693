"""The `moectl` command. Each command parses its arguments, calls one function and prints.

Nothing heavy (torch, pydantic) is imported until a command runs, so `moectl --help` is instant."""

from __future__ import annotations

import typer
import typer.core

from moectl import __version__
from moectl.cli import build as build_cmd
from moectl.cli import compare as compare_cmd
from moectl.cli import convert as convert_cmd
from moectl.cli import data as data_cmd
from moectl.cli import eval as eval_cmd
from moectl.cli import generate as generate_cmd
from moectl.cli import profile as profile_cmd
from moectl.cli import recipes as recipes_cmd
from moectl.cli import train as train_cmd


def _hide_flag_types() -> None:
    """--help shows no `<bool>` type beside on/off flags (they take no value): newer Typer prints one."""
    option = getattr(typer.core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None or getattr(shown, "moectl", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.moectl = True
    option.display_type_rich = display_type_rich


_hide_flag_types()

app = typer.Typer(
    name="moectl",
    help="Research and train Mixture-of-Experts language models from declarative YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moectl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Research and train Mixture-of-Experts language models from declarative YAML recipes."""


app.command("build")(build_cmd.build)
app.command("train")(train_cmd.train)
app.command("compare")(compare_cmd.compare)
app.command("eval")(eval_cmd.eval_run)
app.command("generate")(generate_cmd.generate)
app.command("convert")(convert_cmd.convert)
app.command("profile")(profile_cmd.profile)
app.add_typer(data_cmd.app, name="data")
app.add_typer(recipes_cmd.app, name="recipes")


def main() -> None:
    app()
