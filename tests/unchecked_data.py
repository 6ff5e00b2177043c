"""A data source that skips the token-id check, for tests that need a bad id to reach the model.

speedrun's own sources refuse such shards before any rank starts; a test of what happens when one rank
raises mid-run (a real IndexError in its embedding lookup) needs the fault to get that far.
"""

from __future__ import annotations

from speedrun.data import ShardDataset


class UncheckedShardDataset(ShardDataset):
    def check_token_ids(self, model_vocab_size: int | None = None) -> None:
        pass  # deliberately nothing: see the module docstring
