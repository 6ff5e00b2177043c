"""Byte compressors for the model artifact: zlib (the reference's), lzma, zstd and brotli.

zlib and lzma are in the standard library; zstd and brotli are optional packages (the `zstd` and
`brotli` extras), imported only when chosen, so a missing one is one line naming its extra. A blob
says which compressor made it by its first bytes (zlib, xz and zstd streams each start with a known
header); brotli streams have none, so a blob that matches no other header is tried as brotli. Every
blob is checked on reading: zlib and xz carry a checksum, zstd frames are written with theirs, and a
brotli stream is followed by the CRC-32 of its data.
Nothing here imports torch: the config check that names a bad compressor stays instant.
"""

from __future__ import annotations

import importlib
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass


class CompressorError(ValueError):
    """A compressor that cannot be used: unknown, out-of-range level, or its package missing."""


@dataclass(frozen=True)
class Compressor:
    name: str
    strongest: int  # the level used when none is given: each compressor's best ratio
    levels: range
    package: str | None  # the optional package it needs (None: standard library)
    extra: str | None  # the speedrun extra that installs it
    magic: bytes | None  # the fixed first bytes of its output (None: brotli has none)
    compress: Callable[[bytes, int], bytes]  # (data, level) -> blob
    decompress: Callable[[bytes], bytes]


def _zstd_compress(data: bytes, level: int) -> bytes:
    import zstandard

    # The frame records the content size (decompression needs no size hint) and, with write_checksum,
    # a checksum of it: without one a flipped byte decodes into silently different weights.
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def _zstd_decompress(blob: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(blob)


def _brotli_compress(data: bytes, level: int) -> bytes:
    import brotli

    # Brotli streams carry no checksum (zlib, xz and our zstd frames do), and a flipped byte can decode
    # into silently different weights: the data's CRC-32 follows the stream, 4 bytes big-endian.
    return brotli.compress(data, quality=level) + zlib.crc32(data).to_bytes(4, "big")


def _brotli_decompress(blob: bytes) -> bytes:
    import brotli

    data = brotli.decompress(blob[:-4])
    if zlib.crc32(data).to_bytes(4, "big") != blob[-4:]:
        raise ValueError("the CRC-32 after the brotli stream does not match its data")
    return data


def _zlib_compress(data: bytes, level: int) -> bytes:
    return zlib.compress(data, level=level)


def _lzma_compress(data: bytes, level: int) -> bytes:
    return lzma.compress(data, preset=level)  # the .xz container, whose header `candidates` recognises


_ALL = (
    Compressor("zlib", strongest=9, levels=range(0, 10), package=None, extra=None, magic=None,
               compress=_zlib_compress, decompress=zlib.decompress),
    Compressor("lzma", strongest=9, levels=range(0, 10), package=None, extra=None, magic=b"\xfd7zXZ\x00",
               compress=_lzma_compress, decompress=lzma.decompress),
    Compressor("zstd", strongest=22, levels=range(1, 23), package="zstandard", extra="zstd",
               magic=b"\x28\xb5\x2f\xfd", compress=_zstd_compress, decompress=_zstd_decompress),
    Compressor("brotli", strongest=11, levels=range(0, 12), package="brotli", extra="brotli", magic=None,
               compress=_brotli_compress, decompress=_brotli_decompress),
)  # fmt: skip
COMPRESSORS: dict[str, Compressor] = {c.name: c for c in _ALL}


def _installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def get_compressor(name: str, level: int | None = None, key: str = "export") -> tuple[Compressor, int]:
    """The compressor and the level to use (its strongest when `level` is None), checked: an unknown
    name, a level out of range or a missing package raises CompressorError naming `key`'s fix."""
    compressor = COMPRESSORS.get(name)
    if compressor is None:
        raise CompressorError(f"{key}.compressor={name!r} is not one of {', '.join(COMPRESSORS)}")
    level = compressor.strongest if level is None else level
    if level not in compressor.levels:
        first, last = compressor.levels[0], compressor.levels[-1]
        raise CompressorError(
            f"{key}.level={level} is out of range for {name} ({first}..{last}); "
            f"leave it null for {compressor.strongest}"
        )
    if compressor.package is not None and not _installed(compressor.package):
        raise CompressorError(
            f"{key}.compressor={name} needs the {compressor.package} package: "
            f"pip install 'speedrun[{compressor.extra}]'"
        )
    return compressor, level


def candidates(blob: bytes) -> list[Compressor]:
    """The compressors that may have made `blob`, most likely first: one whose fixed header it starts
    with, else zlib when its first two bytes pass zlib's header check, then brotli (which has no header)."""
    for compressor in COMPRESSORS.values():
        if compressor.magic is not None and blob.startswith(compressor.magic):
            return [compressor]
    found = []
    # RFC 1950: CMF names deflate (low nibble 8), and CMF * 256 + FLG is a multiple of 31.
    if len(blob) >= 2 and blob[0] & 0x0F == 8 and (blob[0] * 256 + blob[1]) % 31 == 0:
        found.append(COMPRESSORS["zlib"])
    return [*found, COMPRESSORS["brotli"]]


def decompress_any(blob: bytes) -> tuple[bytes, str]:
    """(data, compressor name) for a blob of any compressor here; CompressorError when none reads it."""
    errors = []
    for compressor in candidates(blob):
        if compressor.package is not None and not _installed(compressor.package):
            errors.append(
                f"{compressor.name} needs {compressor.package}: pip install 'speedrun[{compressor.extra}]'"
            )
            continue
        try:
            return compressor.decompress(blob), compressor.name
        except Exception as e:  # noqa: BLE001 - each library raises its own error type
            errors.append(f"{compressor.name}: {e}")
    raise CompressorError("; ".join(errors) or "not zlib, lzma, zstd or brotli data")
