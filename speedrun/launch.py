"""Start the ranks of one job: in this process, as N local processes, or under an external torchrun.

The Hydra process hands every rank the already-resolved config (a plain dict), so no rank ever
re-resolves it. N local ranks are started with torch.distributed's elastic launcher, which
watches them: a rank that dies takes the whole job down instead of leaving the others waiting.
Nothing here imports torch at module level: `--cfg job` and config errors stay instant.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable

# Set by this launcher in the ranks it starts, so they do not mistake themselves for ranks of an
# external torchrun (both set RANK / WORLD_SIZE).
INTERNAL_LAUNCH_ENV = "SPEEDRUN_INTERNAL_LAUNCH"


def external_rank() -> int | None:
    """This process's rank when an external torchrun (one node or many) started it, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not os.environ.get(INTERNAL_LAUNCH_ENV):
        return int(os.environ["RANK"])
    return None


def launched_internally() -> bool:
    """Whether this process is a rank that `launch` started."""
    return bool(os.environ.get(INTERNAL_LAUNCH_ENV))


def local_world_size(nproc_per_node: object) -> int:
    """Ranks this job runs on: the external torchrun's world, or trainer.nproc_per_node."""
    from speedrun.config.validate import parse_nproc

    if external_rank() is not None:
        return int(os.environ["WORLD_SIZE"])
    cuda_devices = 0
    if nproc_per_node == "auto":
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return parse_nproc(nproc_per_node, cuda_devices)


def launch(run_rank: Callable[[dict, dict], dict | None], config: dict, info: dict, *, nproc: int,
           external: bool) -> dict | None:  # fmt: skip
    """Run `run_rank(config, info)` on every rank; return rank 0's result when it is local."""
    if external or nproc == 1:
        return run_rank(config, info)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[INTERNAL_LAUNCH_ENV] = "1"  # inherited by the spawned ranks
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"speedrun-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(launch_config, run_rank)(config, info)
    except ChildFailedError as exc:
        raise RankFailure(*_root_cause(exc)) from None
    finally:
        os.environ.pop(INTERNAL_LAUNCH_ENV, None)
    return results.get(0)


class RankFailure(RuntimeError):
    """A rank of an N-rank job raised: the launcher stopped the others; this names the first."""

    def __init__(self, rank: int, message: str):
        super().__init__(f"rank {rank} failed: {message} (traceback in train.log)")
        self.rank = rank


def _root_cause(exc) -> tuple[int, str]:
    """(rank, message) of the failure that came first, from a ChildFailedError.

    The elastic launcher's own choice compares whole-second timestamps, so a rank that failed only
    because a peer died (its collective broke) can tie with, and win over, the real culprit. The
    error files' modification times order them properly: a rank writes its error before it exits,
    and its peers' collectives break only once it has exited.
    """

    def written_ns(item) -> float:
        path = item[1].error_file
        return os.stat(path).st_mtime_ns if os.path.isfile(path) else math.inf

    rank, failure = min(exc.failures.items(), key=written_ns)
    if not os.path.isfile(failure.error_file):  # killed by a signal, or exited without a Python error
        return rank, failure.message if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):  # written by elastic's @record: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    lines = str(message).strip().splitlines()
    return rank, lines[0] if lines else f"exited with code {failure.exitcode}"
