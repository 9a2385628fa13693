"""Reading and writing Hugging Face model folders: config.json, weights (one safetensors file, or
shards with an index; legacy pytorch_model*.bin only through `torch.load(weights_only=True)`).

Nothing here imports transformers: a folder is JSON and tensors.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moectl import progress
from moectl.errors import MoectlError
from moectl.rundir import TOKENIZER, WEIGHTS, ModelFolder

# A Hugging Face folder's files (its weights and tokenizer.json have the names moectl uses too).
SAFE_FILE, SAFE_INDEX = WEIGHTS, f"{WEIGHTS}.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG_JSON, GENERATION_CONFIG = "config.json", "generation_config.json"
TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS = TOKENIZER, "tokenizer_config.json", "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoectlError(f"{Path(path).parent} has no {what}", hint="give a Hugging Face model folder "
                          "(config.json and model*.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoectlError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})",
                          hint=f"the {what} is damaged; download or export the model again") from None
    except RecursionError:
        raise MoectlError(f"{path} cannot be read as JSON: it nests too deeply",
                          hint=f"the {what} is damaged; download or export the model again") from None
    if not isinstance(data, dict):
        raise MoectlError(f"{path} is not a JSON object", hint=f"the {what} is damaged")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MoectlError(f"{folder} is not a folder", hint="give a Hugging Face model folder (config.json and "
                          "model*.safetensors), e.g. what save_pretrained() or huggingface-cli download writes")
    if ModelFolder(folder).config.is_file() and not (folder / CONFIG_JSON).is_file():
        raise MoectlError(f"{folder} is a moectl run folder, not a Hugging Face one",
                          hint=f"export it with: moectl convert {folder} --to hf OUT")
    return read_json(folder / CONFIG_JSON, CONFIG_JSON)


def read_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of a model folder, by name, on the CPU."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        return _read_sharded(folder, SAFE_INDEX, _read_safetensors)
    if (folder / SAFE_FILE).is_file():
        return _read_safetensors(folder / SAFE_FILE)
    if (folder / BIN_INDEX).is_file():
        return _read_sharded(folder, BIN_INDEX, _read_bin)
    if (folder / BIN_FILE).is_file():
        return _read_bin(folder / BIN_FILE)
    raise MoectlError(f"{folder} holds no weights ({SAFE_FILE}, {SAFE_INDEX}, {BIN_FILE} or {BIN_INDEX})",
                      hint="download the model's weight files too, not only config.json")


def _read_sharded(folder: Path, index_name: str, read_one) -> dict[str, Any]:
    index = read_json(folder / index_name, index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise MoectlError(f"{folder / index_name} has no weight_map of tensor names to file names",
                          hint="the index is damaged; download the model again")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not isinstance(s, str) or "/" in s or not (folder / s).is_file()]
    if missing:
        raise MoectlError(f"{folder} lacks {len(missing)} of the {len(shards)} shards its index names "
                          f"({', '.join(map(str, missing[:3]))}{' ...' if len(missing) > 3 else ''})",
                          hint="download the missing shard files")
    state: dict[str, Any] = {}
    advance = progress.current().task(f"reading {folder.name}", len(shards), unit="files")
    for shard in shards:
        state.update(read_one(folder / shard))
        advance()
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise MoectlError(f"{folder / index_name} names tensors no shard holds ({', '.join(absent[:3])})",
                          hint="the shards do not belong to this index; download the model again")
    return state


def _read_safetensors(path: Path) -> dict[str, Any]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise MoectlError(f"{path} is damaged or not a safetensors file ({e})",
                          hint="download or export the model again") from None


def _read_bin(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise MoectlError(f"{path} holds more than tensors (pickled code), and moectl never runs code from a file",
                          hint="convert it to safetensors with a tool you trust, or use the model's "
                               "safetensors files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise MoectlError(f"{path} is damaged ({type(e).__name__})", hint="download the model again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MoectlError(f"{path} is not a state dict of tensors")
    return state


def write_weights(folder: Path, state: dict[str, Any], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write `state` as model.safetensors, or as model-0000i-of-0000n.safetensors shards with an
    index when it is larger than `max_shard_bytes`. Returns the files written."""
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(Path(folder) / SAFE_FILE), metadata={"format": "pt"})
        return [SAFE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    advance = progress.current().task("writing weights", len(shards), unit="files")
    for file, shard in zip(names, shards, strict=True):
        save_file(shard, str(Path(folder) / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        advance()
    total = sum(t.numel() * t.element_size() for t in state.values())
    (Path(folder) / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                       "weight_map": weight_map}, indent=2))
    return [*names, SAFE_INDEX]
