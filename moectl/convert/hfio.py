"""Reading and writing Hugging Face model folders: config.json, weights (one safetensors file, or
shards with an index; legacy pytorch_model*.bin only through `torch.load(weights_only=True)`).

Nothing here imports transformers: a folder is JSON and tensors.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

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


# --------------------------------------------------------------------------- lazy reading

SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in SAFE_DTYPES.items()}


@dataclass(frozen=True)
class Spec:
    """What a tensor will be, known before it is read: its dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Named tensors whose specs are known up front and whose data is read one tensor at a time."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def spec(self, name: str) -> Spec:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())


class DictSource(TensorSource):
    """Tensors already in memory."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def __contains__(self, name: object) -> bool:
        return name in self.state

    def spec(self, name: str) -> Spec:
        t = self.state[name]
        return Spec(t.dtype, tuple(t.shape))

    def get(self, name: str) -> Tensor:
        return self.state[name]


class LazyWeights(TensorSource):
    """The tensors of a model folder (or one safetensors file), read one at a time: each read opens
    its safetensors file, copies that one tensor out and closes it again, so the memory a
    conversion needs is what it holds, not the model. Legacy .bin files are read whole, once."""

    def __init__(self, folder: Path, file: Path | None = None):
        folder = Path(folder)
        self.where: dict[str, Path] = {}
        self.specs: dict[str, Spec] = {}
        self.loaded: dict[str, Tensor] = {}   # legacy .bin tensors
        if file is not None:
            self._add_safetensors(file)
        elif (folder / SAFE_INDEX).is_file():
            for shard in _shards(folder, SAFE_INDEX):
                self._add_safetensors(folder / shard)
            self._check_index(folder, SAFE_INDEX)
        elif (folder / SAFE_FILE).is_file():
            self._add_safetensors(folder / SAFE_FILE)
        elif (folder / BIN_INDEX).is_file():
            self.loaded = _read_sharded(folder, BIN_INDEX, _read_bin)
        elif (folder / BIN_FILE).is_file():
            self.loaded = _read_bin(folder / BIN_FILE)
        else:
            raise MoectlError(f"{folder} holds no weights ({SAFE_FILE}, {SAFE_INDEX}, {BIN_FILE} or {BIN_INDEX})",
                              hint="download the model's weight files too, not only config.json")
        for name, t in self.loaded.items():
            self.specs[name] = Spec(t.dtype, tuple(t.shape))

    def _add_safetensors(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    dtype = SAFE_DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise MoectlError(f"{path}: tensor {name} has dtype {piece.get_dtype()}, which moectl does "
                                          "not read", hint="convert the weights to bf16, fp16 or fp32 first")
                    self.where[name] = path
                    self.specs[name] = Spec(dtype, tuple(piece.get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise MoectlError(f"{path} is damaged or not a safetensors file ({e})",
                              hint="download or export the model again") from None

    def _check_index(self, folder: Path, index_name: str) -> None:
        weight_map = read_json(folder / index_name, index_name)["weight_map"]
        absent = [k for k in weight_map if k not in self.where]
        if absent:
            raise MoectlError(f"{folder / index_name} names tensors no shard holds ({', '.join(absent[:3])})",
                              hint="the shards do not belong to this index; download the model again")

    def names(self) -> list[str]:
        return list(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def spec(self, name: str) -> Spec:
        return self.specs[name]

    def get(self, name: str) -> Tensor:
        if name in self.loaded:
            return self.loaded[name]
        path = self.where[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise MoectlError(f"{path} is damaged: tensor {name} cannot be read ({e})",
                              hint="download or export the model again") from None


class BlockFP8(TensorSource):
    """A source whose float8 weights come with per-block inverse scales (`<name>_scale_inv`, one per
    `block` rows x columns, as DeepSeek-V3's and Kimi K2's published checkpoints store them):
    presented dequantised, in bf16, with the scales hidden."""

    def __init__(self, src: TensorSource, block: tuple[int, int]):
        self.src, self.block = src, block
        names = src.names()
        self.scaled = {n for n in names if src.spec(n).dtype in FP8 and f"{n}_scale_inv" in src}
        self.hidden = {f"{n}_scale_inv" for n in self.scaled}
        self._names = [n for n in names if n not in self.hidden]

    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self.src and name not in self.hidden

    def spec(self, name: str) -> Spec:
        spec = self.src.spec(name)
        return Spec(torch.bfloat16, spec.shape) if name in self.scaled else spec

    def get(self, name: str) -> Tensor:
        t = self.src.get(name)
        if name not in self.scaled:
            return t
        scale = self.src.get(f"{name}_scale_inv").float()
        rows, cols = self.block
        full = scale.repeat_interleave(rows, 0)[: t.shape[0]].repeat_interleave(cols, 1)[:, : t.shape[1]]
        return (t.float() * full).to(torch.bfloat16)


FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantizing(src: TensorSource, cfg: dict[str, Any], where: str) -> TensorSource:
    """`src` as full-precision tensors: block-scaled FP8 dequantised (DeepSeek-V3's format); any
    other quantisation of a config.json (or FP8 without its scales) refused by name."""
    quant = cfg.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "fp8":
        block = quant.get("weight_block_size") or [128, 128]
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise MoectlError(f"{where}: quantization_config.weight_block_size is {block!r}",
                              hint="the config.json is damaged")
        src = BlockFP8(src, (block[0], block[1]))
    elif method not in (None, "mxfp4"):
        raise MoectlError(f"{where}: the weights are quantised with {method!r}, which moectl does not read",
                          hint="moectl dequantises block-scaled FP8 and MXFP4; give the model's unquantised weights")
    raw = [n for n in src.names() if src.spec(n).dtype in FP8]
    if raw:
        raise MoectlError(f"{where}: {raw[0]} is float8 without the scales to dequantise it",
                          hint="give the model's unquantised (bf16) weights, or a checkpoint with its "
                               "weight_scale_inv tensors and quantization_config")
    return src


# --------------------------------------------------------------------------- streaming writing


def write_safetensors(path: Path, plan: list[tuple[str, Spec]], produce: Callable[[str], Tensor],
                      metadata: dict[str, str] | None = None, advance: Callable[[], None] | None = None) -> None:
    """One safetensors file whose tensors are produced one at a time, in `plan` order: the header
    (every name, dtype, shape and offset) is known from the plan and written first, then each
    tensor's bytes as it comes, so only one tensor is held at a time. A produced tensor must match
    its planned dtype and shape."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, spec in plan:
        header[name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, spec in plan:
            t = produce(name)
            if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {spec.dtype} {spec.shape}")
            data = t.detach().cpu().contiguous().reshape(-1)
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))   # the tensor's own bytes, not a copy
            del t, data
            if advance is not None:
                advance()


def write_weights_plan(folder: Path, plan: list[tuple[str, Spec]], produce: Callable[[str], Tensor],
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards with an index when the plan is
    larger than `max_shard_bytes`, written tensor by tensor. Returns the files written."""
    shards: list[list[tuple[str, Spec]]] = [[]]
    size = 0
    for name, spec in plan:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, spec))
        size += spec.nbytes
    advance = progress.current().task("writing weights", len(plan), unit="tensors")
    if len(shards) == 1:
        write_safetensors(Path(folder) / SAFE_FILE, shards[0], produce, advance=advance)
        return [SAFE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        write_safetensors(Path(folder) / file, shard, produce, advance=advance)
        weight_map.update(dict.fromkeys((name for name, _ in shard), file))
    total = sum(spec.nbytes for _, spec in plan)
    (Path(folder) / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                       "weight_map": weight_map}, indent=2))
    return [*names, SAFE_INDEX]


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


def _shards(folder: Path, index_name: str) -> list[str]:
    """The shard files an index names, each present in the folder."""
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
    return shards


def _read_sharded(folder: Path, index_name: str, read_one) -> dict[str, Any]:
    shards = _shards(folder, index_name)
    weight_map = read_json(folder / index_name, index_name)["weight_map"]
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
    """Write `state` (tensors in memory) as model.safetensors, or as shards with an index when it is
    larger than `max_shard_bytes`. Returns the files written."""
    source = DictSource({k: v.contiguous() for k, v in state.items()})
    return write_weights_plan(folder, [(k, source.spec(k)) for k in source.names()], source.get, max_shard_bytes)
