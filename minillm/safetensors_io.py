"""The safetensors file format, read tensor by tensor and written, in plain Python.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N, then N
bytes of JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the end of the header; "__metadata__" holds string pairs), then the raw little-endian
tensor bytes.

Why our own reader: it reads each tensor with ordinary file reads into memory that becomes the
tensor, so loading a checkpoint costs one copy of the weights. A memory-mapped reader (the
`safetensors` package) keeps the file's pages resident while the copies are made, about two copies
at peak. The files we write load in the `safetensors` package and in `transformers` (tested).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, with every tensor's extent checked
    against the file's size (a truncated download is named as such)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        numel = 1
        for n in info["shape"]:
            numel *= n
        expected = numel * torch.tensor([], dtype=DTYPES[info["dtype"]]).element_size()
        if not 0 <= begin <= end or end - begin != expected:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} but its "
                             f"shape {info['shape']} and dtype {info['dtype']} need {expected} bytes")
        if data_start + end > size:
            raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                             f"{data_start + end}, the file has {size} bytes")
    return header, data_start


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) pairs one at a time, in file order."""
    header, data_start = read_header(path)
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, info in entries:
            begin, end = info["data_offsets"]
            dtype, shape = DTYPES[info["dtype"]], info["shape"]
            if end == begin:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buf)
            yield name, torch.frombuffer(buf, dtype=dtype).reshape(shape)


def save_file(tensors: dict[str, torch.Tensor], path: str | Path,
              metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (contiguous CPU copies are made as needed) to `path`, atomically."""
    header, offset = {}, 0
    prepared = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        prepared[name] = t
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in prepared.values():
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
