"""The model artifact: parameter-golf's int8 + zlib (format "int8_clean_per_row_v1") and its variants.

Training runs in bf16/fp32, but the size-limited artifact does not need that precision. The `int8`
scheme is the reference's, byte for byte:
- 2-D float tensors: int8 with one fp16 scale per row (rows track output channels), after
  clipping each row at its 99.99984th absolute percentile so one outlier does not waste the range,
- other large float tensors: int8 with one fp32 scale,
- float tensors of at most 65,536 elements (`keep_float_max_numel`): kept, control tensors (the
  model's `scalar` role) in fp32, the rest in fp16 with the original dtype recorded,
- non-float tensors: kept as they are.
The `int6` scheme (format "mixed_int6_int8_per_row_v1", as later parameter-golf records) stores the
`matrix` role's 2-D tensors with 63 levels per row (|q| <= 31, still one int8 each: the compressor
finds the unused bits) and everything else as `int8` does; the smaller alphabet compresses better.
The quantized object is torch.save'd and compressed (speedrun/compressors.py: zlib level 9 by
default; lzma, zstd, brotli). It holds only tensors, strings, ints and dicts, so it loads with
`torch.load(weights_only=True)`. Next to it the run keeps `final_model.pt`, the raw state dict, as the
reference does.

Code bytes, the other half of a submission's size, are counted here too (`code_bytes`, or the files
the user names in `export.code_files`).
"""

from __future__ import annotations

import ast
import importlib
import io
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speedrun.compressors import CompressorError, decompress_any, get_compressor
from speedrun.data.sources import resolve_path

QUANT_FORMAT = "int8_clean_per_row_v1"
MIXED_INT6_FORMAT = "mixed_int6_int8_per_row_v1"
# The largest |q| of each scheme's matrices: int8 uses 255 levels, int6 63 (as parameter-golf's records).
MATRIX_LEVELS = {"int8": 127, "int6": 31}
# The smallest scale a row may get. The reference floors int8 scales at 1/127, so a row whose values
# are all below 1 uses fewer than 255 levels (kept: its bytes are the reference's). At 63 levels the
# same floor would leave a typical weight row (|w| < 0.2) a handful of levels, so int6 floors its
# scales only where fp16 stops representing them.
MIN_SCALE = {"int8": 1.0 / 127.0, "int6": float(torch.finfo(torch.float16).tiny)}
FORMATS = {"int8": QUANT_FORMAT, "int6": MIXED_INT6_FORMAT}
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
        _defining_module(t) for t in _targets(config or {}) if t.startswith("speedrun.")
    }
    return sum(path.stat().st_size for path in _import_closure(package, roots))


def _defining_module(target: str) -> str:
    """The module that defines a `_target_`'s class: a package may re-export it lazily (speedrun.models)."""
    module, _, name = target.rpartition(".")
    defined = getattr(importlib.import_module(module), name, None)
    return getattr(defined, "__module__", None) or module


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


def named_files_bytes(files: Sequence[Path]) -> int:
    """Bytes of the files a user named as the submission's code (`export.code_files`)."""
    return sum(Path(f).stat().st_size for f in files)


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


def quantize_float_tensor(
    t: Tensor, levels: int = 127, min_scale: float = 1.0 / 127.0
) -> tuple[Tensor, Tensor]:
    """Integer values in [-levels, levels] (stored as int8) and their scale: per row (fp16, shape
    [rows], at least `min_scale`) for matrices, else one fp32 scalar. The defaults are int8's."""
    t32 = t.float()
    if t32.ndim == 2:
        clip_abs = (
            torch.quantile(t32.abs(), CLIP_Q, dim=1)
            if t32.numel()
            else torch.empty((t32.shape[0],), dtype=torch.float32)
        )
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / float(levels)).clamp_min(min_scale)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -levels, levels).to(torch.int8).contiguous()
        return q, scale.to(dtype=PER_ROW_SCALE_DTYPE).contiguous()
    clip_abs = float(torch.quantile(t32.abs().flatten(), CLIP_Q).item()) if t32.numel() else 0.0
    scale = torch.tensor(clip_abs / float(levels) if clip_abs > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(t32, -clip_abs, clip_abs) / scale), -levels, levels)
    return q.to(torch.int8).contiguous(), scale


def quantize_state_dict(
    state_dict: dict[str, Tensor],
    roles: Mapping[str, str] | None = None,
    scheme: str = "int8",
    keep_float_max_numel: int = KEEP_FLOAT_MAX_NUMEL,
) -> tuple[dict[str, Any], dict[str, int]]:
    """The artifact object and byte/tensor counts (`baseline_tensor_bytes`, `payload_bytes`, ...).

    `roles`: parameter name -> role (speedrun.models.protocol): `scalar` tensors are kept in fp32
    rather than fp16, and under `int6` the `matrix` role's 2-D tensors get 63 levels per row."""
    roles = roles or {}
    keep_fp32 = {name for name, role in roles.items() if role == "scalar"}
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
            "payload_bytes",
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
            stats["payload_bytes"] += _nbytes(t)
            continue
        if t.numel() <= keep_float_max_numel:
            kept = _keep_float(name, t, orig_dtypes, keep_fp32)
            passthrough[name] = kept
            stats["payload_bytes"] += _nbytes(kept)
            continue
        stats["num_float_tensors"] += 1
        low_bit = scheme == "int6" and roles.get(name) == "matrix" and t.ndim == 2
        bits = "int6" if low_bit else "int8"
        q, s = quantize_float_tensor(t, MATRIX_LEVELS[bits], MIN_SCALE[bits])
        if s.ndim > 0:
            qmeta[name] = {"scheme": "per_row", "axis": 0, **({"bits": 6} if low_bit else {})}
        quantized[name] = q
        scales[name] = s
        dtypes[name] = _dtype_name(t.dtype)
        stats["payload_bytes"] += _nbytes(q) + _nbytes(s)
    obj: dict[str, Any] = {
        "__quant_format__": FORMATS[scheme],
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


def dequantize_state_dict(obj: dict[str, Any]) -> dict[str, Tensor]:
    """Float tensors in their original dtypes (on CPU), ready for `load_state_dict`: value x scale,
    whatever the scheme (int6 values are int8 values that use fewer levels)."""
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


def _write_atomically(path: Path, blob: bytes) -> None:
    """A reader never sees half a file: write a temporary file, fsync, rename."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_artifact(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an artifact of any scheme and compressor back into a float state dict; ArtifactError
    names the file if it is damaged."""
    path = Path(path)
    blob = path.read_bytes()
    try:
        raw, _ = decompress_any(blob)
    except CompressorError as e:
        raise ArtifactError(
            f"{path}: not a readable artifact ({e}); the file is truncated or corrupt, export it again"
        ) from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{path}: decompressed, but torch.load failed ({e}); export it again") from None
    if not isinstance(obj, dict) or obj.get("__quant_format__") not in FORMATS.values():
        found = obj.get("__quant_format__") if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(
            f"{path}: format {found!r} is not one of {sorted(FORMATS.values())}; export it with speedrun.export"
        )
    return dequantize_state_dict(obj)


class ArtifactFormat:
    """How a run stores its final model (the `export` config group): a quantization scheme (`int8`,
    the reference's, or `int6`: int6 matrices, int8 embeddings), a compressor and its level (None:
    the compressor's strongest), the float tensors small enough to keep, and the files that stand for
    the submission's code (empty: the speedrun source a training job runs, see `code_bytes`).

    Checked when built, so a bad value or a missing package stops the run before it trains.
    """

    def __init__(
        self,
        scheme: str = "int8",
        compressor: str = "zlib",
        level: int | None = None,
        keep_float_max_numel: int = KEEP_FLOAT_MAX_NUMEL,
        code_files: Sequence[str] = (),
    ):
        if scheme not in FORMATS:
            raise ValueError(f"export.scheme={scheme!r} is not one of {', '.join(FORMATS)}")
        self.scheme = scheme
        self.compressor, self.level = get_compressor(compressor, level)
        self.keep_float_max_numel = keep_float_max_numel
        self.code_files = [resolve_path(f) for f in code_files]
        missing = [str(f) for f in self.code_files if not f.is_file()]
        if missing:
            raise ValueError(
                f"export.code_files: {', '.join(missing)} not found; name the file(s) that stand for "
                "the submission's code, relative to the folder you launch from"
            )

    @property
    def name(self) -> str:
        return f"{self.scheme}_{self.compressor.name}"

    @property
    def filename(self) -> str:
        """`final_model.int8.ptz` for the reference's int8 + zlib, else e.g. `final_model.int6.zstd.ptz`."""
        suffix = "" if self.compressor.name == "zlib" else f".{self.compressor.name}"
        return f"final_model.{self.scheme}{suffix}.ptz"

    def write(self, state_dict: dict[str, Tensor], folder: Path, roles: Mapping[str, str]) -> dict:
        """Write `final_model.pt` (raw) and the artifact into `folder`; return the payload statistics."""
        raw_model = _torch_bytes(state_dict)
        _write_atomically(folder / "final_model.pt", raw_model)
        obj, stats = quantize_state_dict(state_dict, roles, self.scheme, self.keep_float_max_numel)
        serialized = _torch_bytes(obj)
        blob = self.compressor.compress(serialized, self.level)
        _write_atomically(folder / self.filename, blob)
        return {
            "format": self.name,
            "level": self.level,
            "file": self.filename,
            "raw_model_bytes": len(raw_model),
            "tensor_bytes": stats["baseline_tensor_bytes"],
            "payload_bytes": stats["payload_bytes"],
            "raw_bytes": len(serialized),
            "compressed_bytes": len(blob),
            "ratio": len(serialized) / len(blob),
        }

    def code_bytes(self, config: dict | None = None) -> int:
        """The submission's code bytes: the named files, else the framework source the job runs (`code_bytes`)."""
        return named_files_bytes(self.code_files) if self.code_files else code_bytes(config)

    def code_description(self) -> str:
        if self.code_files:
            return ", ".join(f.name for f in self.code_files)
        return "the speedrun source a training job runs"
