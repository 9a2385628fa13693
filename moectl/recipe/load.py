"""Reading recipes: YAML with line numbers, `extends:`, dotted overrides, strict validation.

Everything a user can get wrong ends in one `RecipeError` that lists every problem with its key
path and the file and line (or the override) it came from.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from moectl.errors import Issue, MoectlError, RecipeError
from moectl.recipe.checks import check_recipe
from moectl.recipe.plugins import load_plugins
from moectl.recipe.schema import Recipe, recipe_schema, variant_fields
from moectl.rundir import CHECKPOINTS, CONFIG, WEIGHTS, RunDir

Key = tuple[Any, ...]
Sources = dict[Key, str]

_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Bounds on the work one recipe may ask of the loader (far beyond any real recipe).
MAX_FILE_BYTES = 1_000_000
MAX_VALUES = 100_000        # values after expanding YAML aliases
MAX_DEPTH = 64              # nesting of sections and lists
MAX_EXTENDS = 32            # length of an `extends` chain


class RecipeYAMLLoader(yaml.SafeLoader):
    """The safe YAML loader, reading numbers as YAML 1.2 does: `1e-3` is a float (YAML 1.1 wants
    a dot, `1.0e-3`, and reads `1e-3` as a string)."""


RecipeYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml_value(text: str) -> Any:
    """One YAML value (an override's), read by the safe recipe loader."""
    loader = RecipeYAMLLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _Budget:
    """Counts the values a recipe expands to and the depth of nesting, while it is built."""

    def __init__(self, where: str):
        self.where, self.values, self.active = where, 0, set()

    def enter(self, node: yaml.Node, depth: int) -> None:
        self.values += 1
        line = f"{self.where}:{node.start_mark.line + 1}"
        if self.values > MAX_VALUES:
            raise MoectlError(f"{line}: the recipe expands to more than {MAX_VALUES:,} values (YAML aliases "
                              "repeating aliases?)", hint="write the sections out; recipes are small")
        if depth > MAX_DEPTH:
            raise MoectlError(f"{line}: sections and lists nest more than {MAX_DEPTH} levels deep",
                              hint="recipes nest a few levels: model.moe.router.kind")
        if id(node) in self.active:
            raise MoectlError(f"{line}: a YAML alias refers to a section that contains it (a recursive alias)",
                              hint="an alias (*name) may repeat an anchored value (&name), not hold itself")


# --------------------------------------------------------------------------- locating recipes


def shipped_dir() -> Path:
    """The folder of shipped recipes: the repository's recipes/ or the copy inside the wheel."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg.parent / "recipes", pkg / "_recipes"):
        if candidate.is_dir():
            return candidate
    return pkg.parent / "recipes"


def shipped_recipes() -> list[Path]:
    root = shipped_dir()
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def shipped_name(path: Path) -> str:
    return path.resolve().relative_to(shipped_dir().resolve()).with_suffix("").as_posix()


def find_recipe(ref: str | Path) -> Path:
    """A recipe file from a path, a run folder holding config.yaml, or a shipped recipe name."""
    p = Path(ref)
    if p.is_file():
        return p
    if p.is_dir():
        cfg = RunDir(p).config
        if cfg.is_file():
            return cfg
        raise MoectlError(
            f"{ref} is a folder without config.yaml",
            hint="pass a recipe file, or a run folder written by `moectl train`",
        )
    root = shipped_dir()
    name = str(ref)
    for cand in (root / name, root / f"{name}.yaml"):
        if cand.is_file():
            return cand
    names = [shipped_name(q) for q in shipped_recipes()]
    close = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=1)
    hint = f"did you mean {close[0]}?" if close else "`moectl recipes list` shows the shipped recipes"
    raise MoectlError(f"recipe not found: {ref} (no such file or shipped recipe)", hint=hint)


# --------------------------------------------------------------------------- YAML with positions


def _construct(loader: yaml.SafeLoader, node: yaml.Node, key: Key, where: str, sources: Sources,
               issues: list[Issue], budget: _Budget | None = None) -> Any:
    budget = budget or _Budget(where)
    budget.enter(node, len(key))
    if node.tag and node.tag.startswith("tag:yaml.org,2002:python/") or node.tag.startswith("!"):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise MoectlError(f"{where}:{node.start_mark.line + 1}: the YAML tag {tag} "
                          "is not allowed in a recipe (recipes hold plain values; nothing in them is ever run)",
                          hint="remove the tag and write the value itself")
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return loader.construct_object(node, deep=True)
    budget.active.add(id(node))
    try:
        return _construct_collection(loader, node, key, where, sources, issues, budget)
    finally:
        budget.active.discard(id(node))


def _construct_collection(loader: yaml.SafeLoader, node: yaml.Node, key: Key, where: str, sources: Sources,
                          issues: list[Issue], budget: _Budget) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for k_node, v_node in node.value:
            k = loader.construct_object(k_node, deep=True)
            line = k_node.start_mark.line + 1
            path = key + (k,)
            if not isinstance(k, str):
                issues.append(Issue(_dotted(path), f"keys must be strings, got {k!r}", f"{where}:{line}"))
                continue
            if k in out:
                issues.append(Issue(_dotted(path), "duplicate key (the later value would silently win)",
                                    f"{where}:{line}"))
                continue
            sources[path] = f"{where}:{line}"
            out[k] = _construct(loader, v_node, path, where, sources, issues, budget)
        return out
    return [_construct(loader, n, key + (i,), where, sources, issues, budget) for i, n in enumerate(node.value)]


def read_yaml(path: Path) -> tuple[dict[str, Any], Sources]:
    """Parse one YAML file into a dict plus the file:line of every key."""
    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise MoectlError(f"{path} is {size / 1e6:.1f} MB: not a recipe (recipes are a few KB)",
                              hint="check the path; a recipe is a small YAML file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoectlError(f"recipe not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoectlError(f"cannot read recipe {path}: {e}") from None
    loader = None
    try:
        loader = RecipeYAMLLoader(text)
        node = loader.get_single_node()
        sources: Sources = {}
        issues: list[Issue] = []
        data = _construct(loader, node, (), where, sources, issues) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = " ".join(str(x) for x in (e.context, e.problem) if x)
        hint = "check indentation, colons and quotes near that line"
        if "'\\t'" in problem:
            hint = "YAML does not allow tabs for indentation: indent with spaces"
        raise MoectlError(f"{pos}: YAML syntax error: {problem}", hint=hint) from None
    except yaml.reader.ReaderError:
        raise MoectlError(f"{where}: not a text file (it holds control characters or binary data)",
                          hint="a recipe is a small YAML text file; check the path") from None
    except yaml.YAMLError as e:
        raise MoectlError(f"{where}: YAML error: {e}") from None
    except RecursionError:   # the YAML parser itself recurses per level of nesting
        raise MoectlError(f"{where}: sections and lists nest too deeply to read",
                          hint=f"recipes nest a few levels; at most {MAX_DEPTH} are accepted") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise MoectlError(f"{where}: the recipe is empty",
                          hint="a recipe needs at least a `model:` section (see `moectl recipes show quickstart`)")
    if not isinstance(data, dict):
        raise MoectlError(f"{where}: a recipe must be a mapping of keys to values, "
                          f"got a {type(data).__name__}")
    if issues:
        raise RecipeError(where, issues)
    return data, sources


# --------------------------------------------------------------------------- extends and merging

# Sections that may be written as a bare kind name (`block: cartesian` for `block: {kind: cartesian}`).
BARE_KIND_PATHS: tuple[tuple[str, ...], ...] = (("model", "moe", "block"),)


def expand_bare_kinds(data: dict[str, Any], sources: Sources) -> None:
    """Write bare kind names as the mapping they stand for, so a base's `block: cartesian` merges
    with a child's `block: {scale: 2}` and an override can set `model.moe.block.scale`."""
    for path in BARE_KIND_PATHS:
        node: Any = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = {"kind": node[path[-1]]}
            if path in sources:
                sources[(*path, "kind")] = sources[path]



def _merge(base: Any, top: Any) -> Any:
    """Deep-merge `top` over `base`. Lists replace. A section whose `kind` changes is replaced whole,
    since the options of one kind mean nothing to another."""
    if isinstance(base, dict) and isinstance(top, dict):
        if "kind" in base and "kind" in top and base["kind"] != top["kind"]:
            return dict(top)
        out = dict(base)
        for k, v in top.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return top


def run_name_from(text: str) -> str:
    """A valid run name made from a file or folder name (other characters become '-')."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", text).lstrip("._+-")[:128]
    return name or "run"


def resolve_file(path: Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Sources]:
    """Read a recipe file and everything it extends, merged."""
    real = path.resolve()
    if real in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, real))
        raise MoectlError(f"`extends` forms a cycle: {cycle}")
    if len(_chain) >= MAX_EXTENDS:
        raise MoectlError(f"{_chain[0]}: `extends` chains more than {MAX_EXTENDS} recipes (reached {path})",
                          hint="extend a recipe that holds the shared settings instead of a long chain")
    data, sources = read_yaml(path)
    expand_bare_kinds(data, sources)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data, sources
    if not isinstance(base_ref, str):
        raise RecipeError(str(path), [Issue("extends", f"must be a path or recipe name, got {base_ref!r}",
                                            sources.get(("extends",)))])
    base_path = path.parent / base_ref
    if not base_path.is_file():
        try:
            base_path = find_recipe(base_ref)
        except MoectlError:
            raise RecipeError(str(path), [Issue("extends", f"base recipe not found: {base_ref}",
                                                sources.get(("extends",)))],
                              hint="`extends` is resolved relative to the recipe's own folder") from None
    base, base_sources = resolve_file(base_path, (*_chain, real))
    merged = _merge(base, data)
    if "name" not in data:   # a recipe that extends another is its own run, named after its file
        merged["name"] = run_name_from(path.stem)
        sources = {**sources, ("name",): f"{path} (its file name: the recipe sets no name)"}
    return merged, {**base_sources, **sources}


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in text:
        raise MoectlError(f"bad override {text!r}: expected dotted.key=value",
                          hint="for example: model.moe.top_k=2 train.max_steps=100")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not _OVERRIDE_KEY.match(key):
        raise MoectlError(f"bad override {text!r}: {key!r} is not a dotted key path",
                          hint="keys are names joined by dots, e.g. model.moe.router.kind=topk")
    try:
        value = parse_yaml_value(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise MoectlError(f"bad override {text!r}: the value is not valid YAML ({e.__class__.__name__})",
                          hint="quote strings that contain YAML syntax, e.g. name='a: b'") from None
    return tuple(key.split(".")), value


def apply_overrides(data: dict[str, Any], sources: Sources, overrides: Sequence[str]) -> None:
    for text in overrides:
        keys, value = parse_override(text)
        label = f"override {text!r}"
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
                sources[keys[: i + 1]] = label
            elif not isinstance(nxt, dict):
                raise MoectlError(f"bad override {text!r}: {'.'.join(keys[: i + 1])} is a value, "
                                  f"not a section", hint="override a key inside a section")
            node = nxt
        last = keys[-1]
        if last == "kind" and node.get("kind") not in (None, value):
            # A new kind starts its section afresh: the old kind's options from the files would not
            # apply. Options that earlier overrides set are kept (whatever their order on the
            # command line, `router.p=0.5 router.kind=topp` means p = 0.5).
            section = keys[:-1]
            for k in list(node):
                if not str(sources.get(section + (k,), "")).startswith("override "):
                    del node[k]
                    for path in [p for p in sources if p[: len(section) + 1] == section + (k,)]:
                        del sources[path]
            sources[section] = label   # what the section lacks now is the override's to supply
        node[last] = value
        sources[keys] = label
        expand_bare_kinds(data, sources)


# --------------------------------------------------------------------------- validation


def _dotted(path: Iterable[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def model_types(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (through Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out.extend(model_types(arg))
    return out


def _variant_for(models: list[type[BaseModel]], tag: Any) -> type[BaseModel] | None:
    for m in models:
        kind = m.model_fields.get("kind")
        if kind is not None and kind.default == tag:
            return m
    return None


def clean_loc(loc: Sequence[Any], data: Any) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """Drop the union tags pydantic puts into error locations; return the user's key path and the
    section class that holds its last key (for suggestions)."""
    cls: type[BaseModel] | None = recipe_schema()
    holder: type[BaseModel] | None = cls
    out: list[Any] = []
    node = data
    for part in loc:
        if cls is None:
            out.append(part)
            continue
        if isinstance(part, str) and part in cls.model_fields:
            holder = cls
            out.append(part)
            node = node.get(part) if isinstance(node, dict) else None
            models = model_types(cls.model_fields[part].annotation)
            if len(models) > 1:
                tag = node.get("kind", models[0].model_fields["kind"].default) if isinstance(node, dict) else None
                cls = _variant_for(models, tag)
            else:
                cls = models[0] if models else None
            continue
        if len(out) and _variant_for([cls], part) is cls:
            continue  # the discriminator tag pydantic inserts
        holder = cls
        out.append(part)
        cls = None
    return tuple(out), holder


def _all_paths(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for name, field in cls.model_fields.items():
        paths.append((*prefix, name))
        for sub in model_types(field.annotation):
            paths.extend(p for p in _all_paths(sub, (*prefix, name)) if p not in paths)
    return paths


def _suggest(path: tuple[Any, ...], holder: type[BaseModel] | None) -> str | None:
    """The key the user probably meant: the same name in another section, else a close sibling."""
    key = path[-1]
    if not isinstance(key, str):
        return None
    elsewhere = [p for p in _all_paths(recipe_schema()) if p[-1] == key]
    if elsewhere:
        return _dotted(elsewhere[0])
    if holder is not None:
        close = difflib.get_close_matches(key, list(holder.model_fields), n=1, cutoff=0.6)
        if close:
            return _dotted((*path[:-1], close[0]))
    return None


def _other_kinds_with(holder: type[BaseModel] | None, key: Any) -> list[str]:
    """For a key unknown to one variant of a `kind` union, the other kinds that accept it."""
    if holder is None or "kind" not in holder.model_fields:
        return []
    out = []
    for cls in _variants_of(holder):
        if cls is not holder and key in cls.model_fields:
            out.append(cls.model_fields["kind"].default)
    return out


def _all_models(cls: type[BaseModel]):
    yield cls
    for field in cls.model_fields.values():
        for sub in model_types(field.annotation):
            yield from _all_models(sub)


def _variants_of(variant: type[BaseModel]) -> list[type[BaseModel]]:
    """All classes of the discriminated union that `variant` belongs to."""
    for cls in _all_models(recipe_schema()):
        for field in cls.model_fields.values():
            models = model_types(field.annotation)
            if variant in models and len(models) > 1:
                return models
    return [variant]


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# Keys that moectl renamed: an old recipe (or run folder) gets the new name in its error.
RENAMED = {"train.schedule": "train.lr_schedule"}

_TYPE_WORDS = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}


def _issue(err: dict[str, Any], data: dict[str, Any], sources: Sources) -> Issue:
    path, holder = clean_loc(err["loc"], data)
    etype, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if etype == "extra_forbidden":
        msg = "unknown key"
        guess = _suggest(path, holder)
        owners = _other_kinds_with(holder, path[-1])
        if _dotted(path) in RENAMED:
            msg = f"this key was renamed to {RENAMED[_dotted(path)]}"
        elif owners:
            msg = (f"not an option of {path[-2]} kind {holder.model_fields['kind'].default!r}; "
                   f"it belongs to kind {', '.join(map(repr, owners))}")
        elif guess:
            msg += f"; did you mean {guess}?"
    elif etype == "missing":
        msg = "required key is missing"
    elif etype == "union_tag_invalid":
        path = (*path, "kind")
        msg = f"unknown {path[-2]} kind {ctx.get('tag')!r}; choose one of {ctx.get('expected_tags')}"
    elif etype == "union_tag_not_found":
        msg = "needs a `kind` key"
    elif etype in _TYPE_WORDS:
        msg = f"expected {_TYPE_WORDS[etype]}, got {_describe(value)}"
    elif etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[etype]
        bound = next(iter(ctx.values())) if ctx else "?"
        msg = f"must be {op} {bound}, got {value!r}"
    elif etype == "literal_error":
        msg = f"must be one of {ctx.get('expected')}, got {value!r}"
    elif etype == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
    where = None
    for n in range(len(path), 0, -1):
        if path[:n] in sources:
            where = sources[path[:n]]
            break
    return Issue(_dotted(path), msg, where)


def _folder_read(source_name: str) -> Path | None:
    """The folder whose config.yaml this is, when it is a run or model folder (data moectl reads,
    not a recipe the user wrote): its plugins must not come from that folder."""
    path = Path(source_name)
    if path.name != CONFIG:
        return None
    folder = path.parent
    if RunDir(folder).looks_like_run() and ((folder / CHECKPOINTS).is_dir() or (folder / WEIGHTS).is_file()):
        return folder
    return None


def validate(data: dict[str, Any], sources: Sources, source_name: str) -> Recipe:
    """Validate a merged recipe: import its plugins, check every key and type (all problems
    together), then the checks that relate several keys (all of those together)."""
    load_plugins(data.get("plugins"), sources.get(("plugins",)), source_name, read_from=_folder_read(source_name))
    schema = recipe_schema()
    non_finite = [_issue_at(path, "must be a finite number (use null to turn a setting off)", sources)
                  for path in _non_finite(data)]
    if non_finite:
        raise RecipeError(source_name, non_finite)
    try:
        recipe = schema.model_validate(data)
    except ValidationError as e:
        issues = [_issue(err, data, sources) for err in e.errors()]
        raise RecipeError(source_name, issues) from None
    issues = [Issue(i.path, i.message, _where(i.path, sources), i.related,
                    _where(i.related, sources) if i.related else None) for i in check_recipe(recipe)]
    if issues:
        raise RecipeError(source_name, issues)
    return recipe


def _non_finite(value: Any, path: Key = ()) -> list[Key]:
    """Key paths of .inf / .nan values: no recipe setting means anything by them."""
    if isinstance(value, float) and not math.isfinite(value):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, path + (k,))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, path + (i,))]
    return []


def _issue_at(path: Key, message: str, sources: Sources) -> Issue:
    where = next((sources[path[:n]] for n in range(len(path), 0, -1) if path[:n] in sources), None)
    return Issue(_dotted(path), message, where)


def _where(dotted: str, sources: Sources) -> str | None:
    keys = tuple(dotted.split("."))
    for n in range(len(keys), 0, -1):
        if keys[:n] in sources:
            return sources[keys[:n]]
    return None


def load_raw(ref: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], Sources, Path]:
    path = find_recipe(ref)
    data, sources = resolve_file(path)
    apply_overrides(data, sources, overrides)
    return data, sources, path


def load_recipe(ref: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge, override and validate a recipe. Raises MoectlError / RecipeError."""
    data, sources, path = load_raw(ref, overrides)
    return validate(data, sources, str(path))


def resolved(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data. Routed-layer variants that are off are left out,
    so a run folder does not depend on which plugins happen to be installed."""
    data = recipe.model_dump(mode="json", exclude={"extends"})
    moe = (data.get("model") or {}).get("moe")
    if isinstance(moe, dict):
        for name in variant_fields():
            if moe.get(name) is None:
                moe.pop(name, None)
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what a run folder stores as config.yaml)."""
    return yaml.safe_dump(resolved(recipe), sort_keys=False, default_flow_style=None, width=100)
