"""Data: shards, tokenizers, the distributed token stream, the embedded corpus, and the sources `cfg.data` builds.

The exports load on first use, so `import speedrun.data.shards` (prepare, downloads, a corpus
build in a fresh process) does not pay for importing torch.
"""

from __future__ import annotations

from speedrun.lazy import lazy_exports


class DataError(RuntimeError):
    """Data that cannot be used as configured; the message names the path and the fix."""


_EXPORTS = {
    "DataSource": "speedrun.data.sources",
    "FinewebGPT2": "speedrun.data.sources",
    "FinewebSP1024": "speedrun.data.sources",
    "ShardDataset": "speedrun.data.sources",
    "StdlibCorpus": "speedrun.data.sources",
    "DistributedTokenLoader": "speedrun.data.stream",
}

__all__ = ["DataError", *_EXPORTS]

__getattr__ = lazy_exports(__name__, _EXPORTS)
