"""The int8 + zlib model artifact of parameter-golf (format "int8_clean_per_row_v1").

Training runs in bf16/fp32, but the size-limited artifact does not need that precision:
- 2-D float tensors: int8 with one fp16 scale per row (rows track output channels), after
  clipping each row at its 99.99984th absolute percentile so one outlier does not waste the range,
- other large float tensors: int8 with one fp32 scale,
- float tensors of at most 65,536 elements: kept, control tensors (the model's `scalar` role, passed
  in as `keep_fp32`) in fp32, the rest in fp16 with the original dtype recorded,
- non-float tensors: kept as they are.
The quantized object is torch.save'd and zlib-compressed (level 9). It holds only tensors, strings,
ints and dicts, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import ast
import io
import os
import zlib
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

QUANT_FORMAT = "int8_clean_per_row_v1"
KEEP_FLOAT_MAX_NUMEL = 65_536
KEEP_FLOAT_STORE_DTYPE = torch.float16
PER_ROW_SCALE_DTYPE = torch.float16
CLIP_PERCENTILE = 99.99984
CLIP_Q = CLIP_PERCENTILE / 100.0


def code_bytes(config: dict | None = None) -> int:
    """Bytes of the framework source a training job runs, one definition however it is launched.

    The reference counts its one training script as the submission's code. speedrun's equivalent is
    the entry point `speedrun/train.py` plus every speedrun module it can import (lazy imports
    included, read from the source with `ast`, not from what a given process happened to load),
    plus the speedrun modules the config's `_target_`s name and theirs. Tools a job never imports
    (compare, prepare, ...) do not count. In-process, on N ranks, under torchrun or as the k-th job
    of a sweep, the same config gives the same number.
    """
    package = Path(__file__).resolve().parent
    roots = {"speedrun.train"} | {
        t.rpartition(".")[0] for t in _targets(config or {}) if t.startswith("speedrun.")
    }
    return sum(path.stat().st_size for path in _import_closure(package, roots))


def _targets(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for value in node.values() for t in _targets(value)]
    if isinstance(node, list):
        return [t for value in node for t in _targets(value)]
    return []


def _module_path(package: Path, name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return package / "__init__.py"
    for candidate in (
        package.joinpath(*parts[:-1], f"{parts[-1]}.py"),
        package.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def _import_closure(package: Path, roots: set[str]) -> set[Path]:
    """The files of `roots` and of every speedrun module they import, transitively."""
    seen: set[Path] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__ and a/b/__init__ first.
        for depth in range(1, len(parts) + 1):
            path = _module_path(package, ".".join(parts[:depth]))
            if path is None or path in seen:
                continue
            seen.add(path)
            pending.extend(_imports_of(path))
    return seen


def _imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in names if name == "speedrun" or name.startswith("speedrun.")]


class ArtifactError(ValueError):
    """An artifact file that cannot be read back (truncated, corrupt, or another format)."""


def _nbytes(t: Tensor) -> int:
    return int(t.numel()) * int(t.element_size())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _keep_float(name: str, t: Tensor, orig_dtypes: dict[str, str], keep_fp32: Collection[str]) -> Tensor:
    if name in keep_fp32:
        return t.float().contiguous()
    if t.dtype in (torch.float32, torch.bfloat16):
        orig_dtypes[name] = _dtype_name(t.dtype)
        return t.to(dtype=KEEP_FLOAT_STORE_DTYPE).contiguous()
    return t


def quantize_float_tensor(t: Tensor) -> tuple[Tensor, Tensor]:
    """int8 values and their scale: per row (fp16, shape [rows]) for matrices, else one fp32 scalar."""
    t32 = t.float()
    if t32.ndim == 2:
        clip_abs = (
            torch.quantile(t32.abs(), CLIP_Q, dim=1)
            if t32.numel()
            else torch.empty((t32.shape[0],), dtype=torch.float32)
        )
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8).contiguous()
        return q, scale.to(dtype=PER_ROW_SCALE_DTYPE).contiguous()
    clip_abs = float(torch.quantile(t32.abs().flatten(), CLIP_Q).item()) if t32.numel() else 0.0
    scale = torch.tensor(clip_abs / 127.0 if clip_abs > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_abs, clip_abs) / scale), -127, 127)
    return q.to(torch.int8).contiguous(), scale


def quantize_state_dict_int8(
    state_dict: dict[str, Tensor], keep_fp32: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, int]]:
    """The artifact object and byte/tensor counts (`baseline_tensor_bytes`, `int8_payload_bytes`, ...).

    `keep_fp32`: names of small tensors stored in fp32 rather than fp16 (the control tensors)."""
    quantized: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    dtypes: dict[str, str] = {}
    passthrough: dict[str, Tensor] = {}
    orig_dtypes: dict[str, str] = {}
    qmeta: dict[str, dict[str, Any]] = {}
    stats = dict.fromkeys(
        (
            "param_count",
            "num_tensors",
            "num_float_tensors",
            "num_nonfloat_tensors",
            "baseline_tensor_bytes",
            "int8_payload_bytes",
        ),
        0,
    )
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        stats["param_count"] += int(t.numel())
        stats["num_tensors"] += 1
        stats["baseline_tensor_bytes"] += _nbytes(t)
        if not t.is_floating_point():
            stats["num_nonfloat_tensors"] += 1
            passthrough[name] = t
            stats["int8_payload_bytes"] += _nbytes(t)
            continue
        if t.numel() <= KEEP_FLOAT_MAX_NUMEL:
            kept = _keep_float(name, t, orig_dtypes, keep_fp32)
            passthrough[name] = kept
            stats["int8_payload_bytes"] += _nbytes(kept)
            continue
        stats["num_float_tensors"] += 1
        q, s = quantize_float_tensor(t)
        if s.ndim > 0:
            qmeta[name] = {"scheme": "per_row", "axis": 0}
        quantized[name] = q
        scales[name] = s
        dtypes[name] = _dtype_name(t.dtype)
        stats["int8_payload_bytes"] += _nbytes(q) + _nbytes(s)
    obj: dict[str, Any] = {
        "__quant_format__": QUANT_FORMAT,
        "quantized": quantized,
        "scales": scales,
        "dtypes": dtypes,
        "passthrough": passthrough,
    }
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    return obj, stats


def dequantize_state_dict_int8(obj: dict[str, Any]) -> dict[str, Tensor]:
    """Float tensors in their original dtypes (on CPU), ready for `load_state_dict`."""
    out: dict[str, Tensor] = {}
    qmeta = obj.get("qmeta", {})
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    for name, q in obj["quantized"].items():
        dtype = getattr(torch, obj["dtypes"][name])
        s = obj["scales"][name]
        if qmeta.get(name, {}).get("scheme") == "per_row" or s.ndim > 0:
            # Broadcast each row's scale across the trailing dimensions.
            s = s.to(dtype=torch.float32).view(q.shape[0], *([1] * (q.ndim - 1)))
            out[name] = (q.float() * s).to(dtype=dtype).contiguous()
        else:
            out[name] = (q.float() * float(s.item())).to(dtype=dtype).contiguous()
    for name, t in obj["passthrough"].items():
        kept = t.detach().to("cpu").contiguous()
        if name in orig_dtypes:
            kept = kept.to(dtype=getattr(torch, orig_dtypes[name])).contiguous()
        out[name] = kept
    return out


def save_artifact(
    state_dict: dict[str, Tensor], path: str | os.PathLike, keep_fp32: Collection[str] = ()
) -> int:
    """Quantize, compress and write atomically (a reader never sees half a file); returns bytes written."""
    path = Path(path)
    obj, _ = quantize_state_dict_int8(state_dict, keep_fp32)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    blob = zlib.compress(buffer.getvalue(), level=9)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(blob)


def load_artifact(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an artifact back into a float state dict; ArtifactError names the file if it is damaged."""
    path = Path(path)
    blob = path.read_bytes()
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise ArtifactError(
            f"{path}: not a readable int8+zlib artifact ({e}); the file is truncated or corrupt, export it again"
        ) from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{path}: decompressed, but torch.load failed ({e}); export it again") from None
    if not isinstance(obj, dict) or obj.get("__quant_format__") != QUANT_FORMAT:
        found = obj.get("__quant_format__") if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(
            f"{path}: format {found!r} is not {QUANT_FORMAT!r}; export it with speedrun.export"
        )
    return dequantize_state_dict_int8(obj)
