"""The docs are true: every `moectl ...` command in README.md and docs/*.md parses against the real
command line, the cheap ones (build, recipes) run and succeed, and the Python snippets run.

Files the docs define in a block whose first line is `# <path>` (a recipe, a plugin module) are
written into a scratch folder first, next to a small trained run at runs/quickstart, so commands
and snippets that use them run as a reader would run them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import click
import pytest
import typer
from click.testing import CliRunner as ClickRunner
from typer.testing import CliRunner

from moectl.cli.app import app
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
FILE_HEADER = re.compile(r"^# ([\w./-]+\.(?:ya?ml|py|toml))\s*$")
CHEAP = {"build", "recipes"}


def _blocks():
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text()):
            yield doc, m.group(1), m.group(2)


INLINE = re.compile(r"`(moectl [^`]+)`")
PLACEHOLDER = re.compile(r"\.\.\.|[\[\]|]|\b[A-Z][A-Z_]+\b")


def _invocation(words: list[str]) -> list[str] | None:
    """The moectl arguments of one shell command, or None if it does not run moectl."""
    while words and re.match(r"^[A-Z_]+=", words[0]):   # VAR=value prefixes
        words = words[1:]
    if words and words[0].endswith("moectl"):
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["moectl"]:
        return words[words.index("-m") + 2:]   # python -m moectl; torchrun / accelerate launch -m moectl
    return None


def _env(words: list[str]) -> dict[str, str]:
    env = {}
    for w in words:
        if not re.match(r"^[A-Z_]+=", w):
            break
        key, _, value = w.partition("=")
        env[key] = value
    return env


def _split(line: str) -> list[list[str]]:
    """A shell line as its commands (split at &&, ;, |), comments and redirections removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, skip = [], [], False
    for tok in lexer:
        if skip:
            skip = False
        elif tok in ("&&", ";", "|", "||"):
            commands.append(current)
            current = []
        elif tok in (">", ">>", "2>"):
            skip = True
        else:
            current.append(tok)
    return [*commands, current]


def _commands():
    """(doc, line, env, moectl arguments) for every moectl invocation in a shell block, and for every
    inline `moectl ...` span with arguments and no placeholders."""
    out = []
    for doc, lang, text in _blocks():
        if lang not in ("bash", "sh", "console"):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            for words in _split(line):
                args = _invocation(words)
                if args is not None:
                    out.append((doc.relative_to(REPO).as_posix(), line.strip(), _env(words), args))
    for doc in DOCS:
        prose = FENCE.sub("", doc.read_text())
        for m in INLINE.finditer(prose):
            if PLACEHOLDER.search(m.group(1)) or len(m.group(1).split()) < 3:
                continue   # a mention (`moectl build`) or a synopsis with placeholders, not a command
            for words in _split(m.group(1)):
                args = _invocation(words)
                if args is not None:
                    out.append((doc.relative_to(REPO).as_posix(), m.group(1), {}, args))
    return out


COMMANDS = _commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 35
    assert any(args[:1] == ["train"] for *_, args in COMMANDS)


def _parse_only_group() -> click.Group:
    """The real command tree, with every command's body replaced by nothing: invoking it checks
    the arguments and options exactly as the real CLI does, and runs nothing."""
    group = typer.main.get_command(app)

    def neuter(cmd: click.Command) -> None:
        cmd.callback = (lambda *a, **k: None) if not isinstance(cmd, click.Group) else cmd.callback
        for sub in getattr(cmd, "commands", {}).values():
            neuter(sub)

    neuter(group)
    return group


@pytest.mark.parametrize("doc, line, env, args", COMMANDS, ids=[f"{d}: {line}" for d, line, *_ in COMMANDS])
def test_command_parses(doc, line, env, args):
    result = ClickRunner().invoke(_parse_only_group(), args)
    assert result.exit_code == 0, f"{doc}: `{line}` does not parse:\n{result.output}"


@pytest.fixture(scope="module")
def scratch(trained_run, tmp_path_factory):
    """A folder with every file the docs define, and a small trained run at runs/quickstart."""
    root = tmp_path_factory.mktemp("docs")
    for _, _, text in _blocks():
        first = text.splitlines()[0] if text.strip() else ""
        m = FILE_HEADER.match(first)
        if m:
            (root / m.group(1)).parent.mkdir(parents=True, exist_ok=True)
            (root / m.group(1)).write_text(text)
    shutil.copytree(trained_run, root / "runs" / "quickstart")
    return root


DEFINED = {FILE_HEADER.match(text.splitlines()[0]).group(1) for _, _, text in _blocks()
           if text.strip() and FILE_HEADER.match(text.splitlines()[0])} | {"runs/quickstart"}


def _runnable(args) -> bool:
    """Cheap, and every file or run folder it reads is one the docs define (or a shipped recipe)."""
    if not args or args[0] not in CHEAP:
        return False
    reads = [a for a in args[1:] if not a.startswith("-") and "=" not in a
             and (re.search(r"\.(ya?ml|json)$", a) or a.startswith("runs/"))]
    outputs = {args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-o", "--output", "--save")}
    return all(a in DEFINED or a in outputs for a in reads)


RUNNABLE = [c for c in COMMANDS if _runnable(c[3])]


def test_most_cheap_commands_run():
    cheap = [c for c in COMMANDS if c[3] and c[3][0] in CHEAP]
    assert len(RUNNABLE) >= 20 and len(RUNNABLE) >= 0.8 * len(cheap), [c[1] for c in cheap if c not in RUNNABLE]


@pytest.mark.processes
@pytest.mark.parametrize("doc, line, env, args", RUNNABLE, ids=[f"{d}: {line}" for d, line, *_ in RUNNABLE])
def test_cheap_command_runs(doc, line, env, args, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    if env:   # e.g. PYTHONPATH=. for a plugin: a fresh process, as the reader runs it
        full_env = {**os.environ, **{k: str((scratch / v).resolve()) if k == "PYTHONPATH" else v
                                     for k, v in env.items()}}
        proc = subprocess.run([sys.executable, "-m", "moectl", *args], cwd=scratch, env=full_env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{doc}: `{line}` failed:\n{proc.stderr}"
        return
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{doc}: `{line}` failed:\n{result.output}"


SNIPPETS = [(doc.relative_to(REPO).as_posix(), text) for doc, lang, text in _blocks() if lang == "python"]


def test_the_docs_have_snippets():
    assert len(SNIPPETS) >= 3


@pytest.mark.processes
@pytest.mark.parametrize("doc, text", SNIPPETS, ids=[f"{d}#{i}" for i, (d, _) in enumerate(SNIPPETS)])
def test_python_snippet_runs(doc, text, scratch):
    compile(text, doc, "exec")
    if FILE_HEADER.match(text.splitlines()[0]):
        return   # a module the docs define: written into the scratch folder, used by the commands there
    proc = subprocess.run([sys.executable, "-c", text], cwd=scratch, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{scratch}{os.pathsep}{REPO}"})
    assert proc.returncode == 0, f"{doc}: a Python snippet fails:\n{text}\n{proc.stderr}"
