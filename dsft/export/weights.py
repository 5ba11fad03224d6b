"""Safetensors weights read tensor by tensor and written shard by shard, so no step holds a whole model.

Reading: a model directory's weight files (one model.safetensors, or shards listed in
model.safetensors.index.json) are indexed from their headers only; each tensor is read when it is written.
Writing: planned tensors are grouped into shards of at most max_shard_bytes (a larger tensor gets a shard of its
own), with an index json when there are several, named as transformers' save_pretrained names them. Each file is
written in the safetensors format (an 8-byte header length, a JSON header of names, dtypes, shapes and offsets,
then the raw little-endian data) by dsft itself: safetensors' save_file takes a whole file's tensors at once,
while the header can be written from the plan alone, so each tensor is formed, written and freed in turn and the
peak memory is one tensor, whatever the shard size.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dsft.errors import DsftError
from dsft.paths import resolve_inside

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
"""Default output shard size: 2 GB, small enough that forming one shard in memory is cheap on any machine."""

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a weight file, known from the file's header: its key, file, shape and dtype."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: name, shape and dtype known up front, values formed by produce() when written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """Bytes of a size such as 2GB, 500MB, 1GiB or 1000000 (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024).

    Raises DsftError for anything else or a size below 1 byte.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise DsftError(f"--max-shard-size: {text!r} is not a size; use e.g. 2GB, 500MB, 1GiB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def weight_files(model_dir: Path, stem: str = "model") -> list[Path]:
    """The safetensors files of model_dir in index order (stem.safetensors, or the shards its index lists).

    Raises DsftError when there are none or a listed file resolves outside model_dir.
    """
    index = model_dir / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    elif (model_dir / f"{stem}.safetensors").is_file():
        names = [f"{stem}.safetensors"]
    else:
        raise DsftError(f"{model_dir}: no {stem}.safetensors (or {stem}.safetensors.index.json)")
    return [resolve_inside(model_dir, name, "weights file") for name in names]


def read_index(model_dir: Path, stem: str = "model") -> dict[str, StoredTensor]:
    """Every tensor of model_dir's weights (stem*.safetensors), in file order, from the file headers (no tensor
    data is read).

    Raises DsftError as weight_files does, or for a key stored twice or a dtype safetensors does not name.
    """
    from safetensors import safe_open

    stored: dict[str, StoredTensor] = {}
    for path in weight_files(model_dir, stem):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                if key in stored:
                    raise DsftError(f"{path}: tensor {key!r} is also stored in {stored[key].file.name}")
                header = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                if dtype is None:
                    raise DsftError(f"{path}: tensor {key!r} has dtype {header.get_dtype()}, which dsft cannot export")
                stored[key] = StoredTensor(key, path, tuple(header.get_shape()), dtype)
    return stored


class TensorReader:
    """Reads tensors from safetensors files, keeping one file open at a time (its memory map is released when the
    next file is opened), so reading a model in file order maps no more than one input file at once."""

    def __init__(self):
        self._path: Path | None = None
        self._handle = None

    def read(self, path: Path, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if path != self._path:
            self.close()
            self._handle, self._path = safe_open(path, framework="pt"), path
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle, self._path = None, None


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of tensors of at most max_shard_bytes each; a larger tensor gets a group of its own."""
    shards: list[list[PlannedTensor]] = []
    shard_bytes = 0
    for tensor in tensors:
        if not shards or (shard_bytes + tensor.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += tensor.nbytes
    return shards


def write_shards(tensors: list[PlannedTensor], out_dir: Path, max_shard_bytes: int) -> dict:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors shards plus an index json.

    Tensors are formed by produce() one at a time, written and freed. Returns {"shards": n, "total_bytes": bytes,
    "dtypes": names}. Raises DsftError if a produced tensor has not the planned shape or dtype.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    for name, shard in zip(names, shards):
        write_safetensors(out_dir / name, shard)
    total_bytes = sum(t.nbytes for t in tensors)
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"shards": len(shards), "total_bytes": total_bytes, "dtypes": dtype_names(t.dtype for t in tensors)}


def write_safetensors(path: Path, tensors: list[PlannedTensor]) -> None:
    """One safetensors file of tensors, in their order: the header from the plan, then each tensor's bytes as it
    is produced. Raises DsftError as _checked does."""
    if sys.byteorder != "little":
        raise DsftError("dsft export writes safetensors (little-endian) on little-endian machines only")
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for tensor in tensors:
            values = _checked(tensor)
            file.write(values.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's own memory, no copy
            del values


def passthrough(stored: dict[str, StoredTensor], reader: TensorReader, dtype: torch.dtype | None) -> Iterator[PlannedTensor]:
    """Each stored tensor unchanged, cast to dtype where it is floating and dtype is given."""
    for item in stored.values():
        out_dtype = output_dtype(item.dtype, dtype)
        yield PlannedTensor(item.key, item.shape, out_dtype,
                            lambda item=item, out_dtype=out_dtype: reader.read(item.file, item.key).to(out_dtype))


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """requested for a floating tensor when given; integer, bool and float8 tensors keep theirs (a float8 weight
    means nothing without the scale stored beside it)."""
    return requested if requested is not None and stored.is_floating_point and stored.itemsize > 1 else stored


def dtype_names(dtypes: Iterable[torch.dtype]) -> list[str]:
    """The distinct dtypes, by their torch names (float32, bfloat16, ...), sorted."""
    return sorted({str(dtype).removeprefix("torch.") for dtype in dtypes})


def _checked(tensor: PlannedTensor) -> torch.Tensor:
    values = tensor.produce()
    if tuple(values.shape) != tensor.shape or values.dtype != tensor.dtype:
        raise DsftError(f"export: {tensor.name} came out {tuple(values.shape)} {values.dtype}, "
                        f"planned {tensor.shape} {tensor.dtype}; nothing was exported")
    return values.contiguous()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for extent in shape:
        count *= extent
    return count
