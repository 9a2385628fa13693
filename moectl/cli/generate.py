"""`moectl generate`: sample text from a trained run, with a KV cache."""

from __future__ import annotations

import math

import typer
from rich.text import Text

from moectl.cli.common import handle_errors, pick_device, single_process, stderr_console

RUN_HELP = "A run folder written by `moectl train`, one of its checkpoints/step-* folders, or its checkpoints/latest."


@handle_errors
def generate(
    run: str = typer.Argument(..., help=RUN_HELP, metavar="RUN"),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The text to continue (at least one token)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=0, help="Most new tokens per sample; "
                                       "generation also stops at the end-of-text token and when prompt and new "
                                       "tokens fill the model's seq_len positions (with a note)."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0, help="Sampling temperature; 0 = "
                                      "greedy (always the most probable token)."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="Sample only from the K most probable tokens "
                              "(default: all)."),
    top_p: float = typer.Option(None, "--top-p", help="Sample only from the "
                                "smallest set of most probable tokens whose probability reaches P, 0 < P <= 1 "
                                "(default: all)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed of the sampling generator; sample i "
                             "uses seed + i. The same seed gives the same text."),
    step: int = typer.Option(None, "--step", help="Use the checkpoint of this step (default: the run's latest)."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one), cpu, cuda or cuda:N."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="How many samples to draw (needs "
                                    "--temperature above 0)."),
) -> None:
    """Continue a prompt with a trained run's model and print the prompt and its continuation. Writes nothing.

    Routers that look at the whole batch (expert_choice) are refused; a capacity limit is off while generating (a
    note says so). Exit codes: 0 done, 2 bad run, prompt or option."""
    from moectl.core.generation import GenerationError
    from moectl.errors import MoectlError

    try:
        _generate(run, prompt, max_new_tokens, temperature, top_k, top_p, seed, step, device, num_samples)
    except GenerationError as e:
        raise MoectlError(e.message, hint=e.hint) from None


def _generate(run: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
              top_p: float | None, seed: int, step: int | None, device: str, num_samples: int) -> None:
    from moectl.core.generation import capacity_note, check_generatable
    from moectl.core.generation import generate as sample
    from moectl.errors import MoectlError
    from moectl.runs import load_run

    single_process("generate")
    if not prompt:
        raise MoectlError("--prompt is empty: generation continues a prompt of at least one token",
                          hint="give the text to continue, e.g. --prompt 'def '")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:   # bytes the shell passed that are not UTF-8 arrive as surrogates
        raise MoectlError("--prompt is not valid UTF-8 text", hint="give the prompt as UTF-8 text") from None
    if not math.isfinite(temperature):
        raise MoectlError(f"--temperature {temperature} is not a finite number",
                          hint="use 0 (greedy) or a positive temperature such as 0.8")
    if num_samples > 1 and temperature == 0:
        raise MoectlError(f"--num-samples {num_samples} with --temperature 0 (greedy) prints the same text "
                          f"{num_samples} times", hint="sample with a temperature above 0, e.g. --temperature 0.8")
    loaded = load_run(run, step=step, device=pick_device(device))
    model, tok = loaded.model, loaded.tokenizer
    check_generatable(model)
    if tok is None:
        raise MoectlError(f"{loaded.checkpoint} has no tokenizer (tokenizer.json), so a prompt cannot be encoded",
                          hint="give a run folder written by `moectl train`, which saves its tokenizer")
    prompt_ids = tok.encode_text(prompt)
    seq_len = model.args.seq_len
    if len(prompt_ids) >= seq_len:
        raise MoectlError(f"the prompt is {len(prompt_ids)} tokens; the model was trained on {seq_len} positions "
                          "(model.seq_len), so no new token fits after it",
                          hint=f"shorten the prompt to at most {seq_len - 1} tokens")
    err = stderr_console()
    note = capacity_note(model)
    if note:
        err.print(Text(f"note: {note}"))
    for i in range(num_samples):
        result = sample(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed + i, stop_ids={tok.eot_id})
        if num_samples > 1:
            typer.echo(f"--- sample {i + 1} (seed {seed + i})")
        typer.echo(tok.decode(prompt_ids + result.ids))
        if result.stopped == "seq_len":
            err.print(f"note: stopped after {len(result.ids)} new tokens: prompt and continuation fill the model's "
                      f"{seq_len} positions (model.seq_len)")

