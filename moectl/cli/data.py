"""`moectl data prepare`: tokenise a recipe's corpus into the cache, without training."""

from __future__ import annotations

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, handle_errors, stdout_console

app = typer.Typer(help="Prepare training data (tokenizer and token shards).", no_args_is_help=True)


@app.command("prepare")
@handle_errors
def prepare(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Read the recipe's documents, split them, train or load the tokenizer and write the token shards to the cache (reused by `moectl train`). Prints where everything is."""  # noqa: E501
    from rich.table import Table

    from moectl.data.prepare import prepare_data
    from moectl.recipe.load import load_recipe

    rec = load_recipe(recipe, overrides or [])
    console = stdout_console()
    data = prepare_data(rec, show_progress=not quiet, log=console.print if not quiet else (lambda *a: None))
    idx = data.index
    t = Table(title="prepared data", title_justify="left", show_header=False)
    t.add_column()
    t.add_column()
    t.add_row("source", idx["source"])
    t.add_row("tokenizer", f"{data.tokenizer_path} ({idx['vocab_size']} tokens, end-of-text id {idx['eot_id']})")
    for split in ("train", "val"):
        s = idx["splits"][split]
        t.add_row(split, f"{s['documents']:,} documents, {s['tokens']:,} tokens")
    t.add_row("shards", f"{data.dir} ({idx['dtype']})")
    t.add_row("validation unigram entropy", f"{idx['val_unigram_entropy']:.4f} nats")
    console.print(t)
