"""`moectl data prepare`: tokenise a recipe's corpus into the cache, without training."""

from __future__ import annotations

import typer

from moectl.cli.common import OVERRIDES_HELP, RECIPE_HELP, handle_errors, plain_log, stdout_console

app = typer.Typer(help="Prepare training data (tokenizer and token shards).", no_args_is_help=True)


@app.command("prepare")
@handle_errors
def prepare(
    recipe: str = typer.Argument(..., help=RECIPE_HELP, metavar="RECIPE"),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False, metavar="KEY=VALUE..."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Read the recipe's documents, split them, train or load the tokenizer and write the token shards to the cache
    (reused by `moectl train`). Prints where everything is."""
    from rich.table import Table

    from moectl.data.prepare import prepare_data
    from moectl.recipe.load import load_recipe

    rec = load_recipe(recipe, overrides or [])
    console = stdout_console()
    data = prepare_data(rec, show_progress=not quiet, log=plain_log(console, "") if not quiet else (lambda *a: None))
    t = Table(title="prepared data", title_justify="left", show_header=False)
    t.add_column()
    t.add_column()
    t.add_row("source", data.source)
    t.add_row("tokenizer", f"{data.tokenizer_path} ({data.vocab_size} tokens, end-of-text id {data.eot_id})")
    for name, split in data.splits.items():
        t.add_row(name, f"{split.documents:,} documents, {split.tokens:,} tokens")
    t.add_row("shards", f"{data.dir} ({data.dtype})")
    t.add_row("validation unigram entropy", f"{data.val_unigram_entropy:.4f} nats")
    console.print(t)
