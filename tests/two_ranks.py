"""Run an optimizer on two real gloo ranks (torch.multiprocessing) and on one, for the tests that check
an optimizer's distributed sharing of its work computes exactly what one rank computes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Problem = Callable[[], tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]]
MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def run_steps(make_optimizer: MakeOptimizer, params: list, grads: list[list[torch.Tensor]]):
    """One optimizer step per list of gradients; returns the optimizer."""
    opt = make_optimizer(params)
    for step_grads in grads:
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad.clone()
        opt.step()
    return opt


def on_two_ranks(problem: Problem, make_optimizer: MakeOptimizer, folder: Path) -> list[dict]:
    """Each rank's final parameters and optimizer state (`{"params", "state"}`), from two processes that
    ran the same problem under torch.distributed. Both callables must be module-level (they are pickled)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(folder / "rank")
    mp.spawn(_worker, args=(port, out, problem, make_optimizer), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]


def _worker(rank: int, port: int, out: str, problem: Problem, make_optimizer: MakeOptimizer) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params, grads = problem()
        opt = run_steps(make_optimizer, params, grads)
        torch.save({"params": [p.detach() for p in params], "state": opt.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
