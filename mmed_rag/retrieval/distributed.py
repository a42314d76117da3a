"""What fine-tuning a retriever on N processes needs: the process group, the data split, the contrastive loss.

``torchrun --nproc_per_node N -m mmed_rag.cli finetune-clip ...`` starts N copies of the stage; each reads its
rank from the environment torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR/PORT``). Three
things make the N processes train what one process with the whole batch trains:

- :class:`RankBatches`: every process draws the same epoch order and takes its slice of each step's batch, so the
  pairs of a step over all processes are the one-process batch;
- :func:`contrastive_loss`: open_clip's :class:`~open_clip.loss.ClipLoss`, whose negatives are the features of
  every process (gathered), not only this one's;
- DistributedDataParallel averages the gradients (in :mod:`mmed_rag.retrieval.finetune`).

And one thing keeps a failure from turning into a hang: :meth:`World.all_or_none` makes a block that raises on one
process raise on all, and the process group's timeout ends any other wait (torchrun itself stops the other
processes when one exits with an error).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch.utils.data import Sampler

from mmed_rag.config import ConfigError
from mmed_rag.device import resolve_device
from mmed_rag.errors import MMedRAGError

logger = logging.getLogger(__name__)


class PeerFailedError(MMedRAGError):
    """Another process of the run failed; its own error says why (this one stops instead of waiting for it)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank among ``size`` processes, and the device it trains on."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 validates and writes every output; the other ranks only train."""
        return self.rank == 0

    def gather(self, value: object) -> list:
        """``value`` of every process, by rank (pickled; for a few small values, not for tensors in a loop)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes (detached): the loss of the whole step, for logging and checks."""
        value = value.detach().float().clone()
        if self.size > 1:
            dist.all_reduce(value)
            value /= self.size
        return value

    @contextlib.contextmanager
    def all_or_none(self, what: str) -> Iterator[None]:
        """Run the block on every process; when it raises on any, it raises on all.

        Every process reports after the block whether it failed, so the others raise :class:`PeerFailedError`
        instead of waiting for a collective the failed one never joins. This report is also the barrier of a
        block only rank 0 works in (validation, checkpoints). The block itself must not call collectives: a
        process that failed before one would leave the others in it.
        """
        try:
            yield
        except Exception:
            with contextlib.suppress(Exception):  # the peers learn of it; the error to show is this one
                self.gather(True)
            raise
        failed = [rank for rank, flag in enumerate(self.gather(False)) if flag]
        if failed:
            raise PeerFailedError(f"{what} failed on process {', '.join(map(str, failed))}; its error is above")


@contextlib.contextmanager
def joined_world(device: str, timeout_s: float) -> Iterator[World]:
    """The run's :class:`World`: a process group when torchrun started this process with others, else one process.

    Each process takes the GPU of its ``LOCAL_RANK`` (NCCL), or trains on the CPU (gloo); ``device`` only says
    which of the two. A collective that waits longer than ``timeout_s`` fails instead of hanging. A process group
    that the caller already set up is used as it is and left open.
    """
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), _rank_device(device))
        return
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield World(device=resolve_device(device))
        return
    local = _rank_device(device)
    if local.type == "cuda":
        torch.cuda.set_device(local)
    backend = "nccl" if local.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        world = World(dist.get_rank(), dist.get_world_size(), local)
        if world.is_main:
            logger.info("Training on %d processes (%s, %s).", world.size, backend, local.type)
        yield world
    finally:
        dist.destroy_process_group()


def _rank_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"device: {name!r} names one GPU, but under torchrun each process takes the GPU of its LOCAL_RANK; "
            "give device=cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class RankBatches(Sampler[list[int]]):
    """This process's share of every step's batch, in the epoch's order.

    The epoch's order is one permutation of the ``n`` pairs drawn from ``generator`` (seeded alike on every
    process); step k's batch is its k-th run of ``per_rank * size`` pairs (an incomplete tail is dropped, as in
    open_clip, so every contrastive batch has as many negatives), and rank r takes the r-th slice of it. So the
    pairs of a step, over all processes in rank order, are the batch one process with ``per_rank * size`` pairs
    a step trains on, whatever the number of processes.
    """

    def __init__(self, n: int, per_rank: int, rank: int, size: int, generator: torch.Generator):
        self.n, self.per_rank, self.rank, self.size, self.generator = n, per_rank, rank, size, generator

    def __len__(self) -> int:
        return self.n // (self.per_rank * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        step = self.per_rank * self.size
        for start in range(0, len(self) * step, step):
            first = start + self.rank * self.per_rank
            yield order[first : first + self.per_rank]


def contrastive_loss(world: World, local_loss: bool, gather_with_grad: bool) -> ClipLoss:
    """open_clip's CLIP loss over the whole step's batch: this process's pairs against every process's features.

    With ``gather_with_grad`` the gradient of the loss flows back through the gathered features to the process
    that computed them (the all-gather's backward sums what every process sends back), and DDP's averaging then
    gives each weight exactly the one-process gradient: with ``local_loss=False`` every process computes the full
    loss L, each process's features receive N dL/df, and the average over N processes is dL/dθ; with
    ``local_loss=True`` process r computes the loss of its own rows, L_r, whose mean over processes is L, and the
    same sum-then-average gives dL/dθ again (with N times fewer logits per process). The logit scale gets the
    average of N equal gradients (or of the L_r's, whose mean is L's). No loss rescaling is needed.

    Without it (open_clip's default), the gathered features are constants: each process's features receive only
    dL/df of the one copy it computed, so after DDP's average the encoders' gradients are 1/N of one process's
    while the logit scale's is not scaled (AdamW, which normalises each weight's steps, makes that small); with
    ``local_loss=True`` too, the gradient through the other processes' features is lost altogether.
    """
    if world.is_main and world.size > 1 and not gather_with_grad:
        lost = "loses the gradient through other processes' features" if local_loss else "is 1/N of one process's"
        logger.warning("gather_with_grad=False: the encoders' gradient %s (see contrastive_loss).", lost)
    return ClipLoss(
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        cache_labels=True,
        rank=world.rank,
        world_size=world.size,
    )
