"""Distributed training on torch.distributed: process group, data sharding, launching torchrun.

``featcodec train`` run under ``torchrun`` (or with ``--nproc N``, which starts
torchrun itself) trains each BU with DistributedDataParallel: NCCL on GPUs, gloo
on CPUs. Every step draws the same global batch as a single process would, and a
DistributedSampler gives each rank its share of it, so the averaged gradient is
the single-process gradient (up to float rounding and the entropy model's
training noise). Every rank builds its share of the feature cache; rank 0 writes checkpoints and
the weights file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .errors import FeatcodecError


class DistributedError(FeatcodecError):
    """Settings that cannot run distributed."""


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this process created the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of the indices of one global batch (the batch itself in a single process)."""
        if not self.distributed:
            return global_batch
        sampler = DistributedSampler(
            range(len(global_batch)), num_replicas=self.world_size, rank=self.rank, shuffle=False, drop_last=True
        )
        return global_batch[list(sampler)]

    def average_gradients(self, parameters) -> None:
        """Average the gradients of ``parameters`` over ranks (those DDP does not synchronise)."""
        if not self.distributed:
            return
        for parameter in parameters:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= self.world_size

    def close(self) -> None:
        """Destroy the process group if this process created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> tuple[Context, str]:
    """Join the torchrun process group if the environment names one; returns the context and this rank's device.

    On GPUs each rank takes ``cuda:LOCAL_RANK`` and the backend is NCCL; on CPUs it is gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda was given but no GPU is visible")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Context(rank, world_size, owns), device


def wrap(unit: torch.nn.Module, context: Context, device: str) -> torch.nn.Module:
    """``unit`` in DistributedDataParallel when distributed (the entropy model's quantiles stay local:
    they have their own loss, averaged by :meth:`Context.average_gradients`)."""
    if not context.distributed:
        return unit
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, _ in unit.named_parameters() if name.endswith(".quantiles")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(unit, ignored)
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(unit, device_ids=device_ids)


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``featcodec <argv>`` under torchrun with ``nproc`` processes on this machine; its exit code.

    The launcher runs in a child process (``python -m featcodec.distributed``) that turns a failed
    worker into that worker's exit code, so the user sees the worker's one-line error, not
    torchrun's traceback and failure report.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set, without its banner
    command = [sys.executable, "-m", "featcodec.distributed", str(nproc), *argv]
    try:
        return subprocess.run(command, check=False, env=env).returncode
    except KeyboardInterrupt:
        return 130


def _torchrun(nproc: int, argv: list[str]) -> int:
    """torchrun's launcher in this process: ``nproc`` workers running ``featcodec <argv>``."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers report errors
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "featcodec", *argv]))
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(int(sys.argv[1]), sys.argv[2:]))
