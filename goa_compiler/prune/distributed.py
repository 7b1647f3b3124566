"""Calibration spread over processes (torch.distributed): the windows are split across
ranks, every statistic is a sum (prune/stats.py) and is all-reduced before it is used, and
rank 0's decisions are broadcast, so every rank holds the same plan and weights.

    torchrun --nproc_per_node N -m goa_compiler compile MODEL --ratio R --out OUT

A process started without torchrun (no WORLD_SIZE in its environment, or 1) is ``SINGLE``:
every method is then a no-op and nothing of torch.distributed is touched. Rank 0 leads: it
alone measures, rewrites, exports and writes OUT (driver/pipeline.py); the other ranks run
capture, analysis and the calibration passes and exit.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# a rank may wait while rank 0 evaluates or exports before the calibration starts
TIMEOUT = datetime.timedelta(hours=6)


class DistributedError(Exception):
    """The process group cannot be used for this compile (a one-line reason)."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    joined: bool = False        # this compile joined the process group (and leaves it)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        """This rank's windows of ``n``: a contiguous block (the blocks of ranks 0..N-1 in
        order are 0..n-1), so a window's number, and its validation fold, do not depend on
        the number of ranks."""
        if n < self.world:
            raise DistributedError(f"{n} calibration windows cannot be split over {self.world} ranks "
                                   f"(--num-samples must be at least the number of processes)")
        per, extra = divmod(n, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))

    def sum(self, tensors) -> None:
        """All-reduce (SUM) each tensor in place."""
        if self.active:
            for t in tensors:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)

    def share(self, tensors) -> None:
        """Rank 0's values of the tensors, in place on every rank."""
        if self.active:
            for t in tensors:
                torch.distributed.broadcast(t, src=0)

    def share_object(self, obj):
        """Rank 0's value of a picklable object (small: unit lists, records)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def leave(self) -> None:
        """Destroy the process group this compile joined (a group the caller made is left
        alone). Without it gloo's worker threads outlive the interpreter, and a rank that
        exits first can abort at shutdown ('terminate called without an active exception')."""
        if self.joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SINGLE = Ranks()


def launched_lead() -> bool:
    """Whether this process is rank 0 of its torchrun launch (or not launched by torchrun),
    read from the environment without joining the process group."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def from_environment() -> Ranks:
    """The ranks torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...),
    joining its process group (gloo for CPU tensors, NCCL for CUDA ones) once; SINGLE
    without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("WORLD_SIZE is set but this torch has no torch.distributed")
    joined = not dist.is_initialized()
    if joined:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the torch.distributed process group: {e}") from e
    return Ranks(dist.get_rank(), dist.get_world_size(), joined)


def reduce_stats(ranks: Ranks, *stats) -> None:
    """Sum statistics (Moments, FoldedCross, HeadSimilarity; None is skipped) over the
    ranks, in place: afterwards every rank holds the statistics of all windows."""
    if not ranks.active:
        return
    from goa_compiler.prune.stats import FoldedCross

    for st in stats:
        if st is None:
            continue
        ranks.sum(st.tensors())
        if isinstance(st, FoldedCross):
            st.drop_empty()
