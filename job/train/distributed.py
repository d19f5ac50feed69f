"""Several processes (GPUs, hosts): the topology, rank-consistent random draws, gradient
averaging, and the per-step agreement on loss and stop.

Data parallel, as DDP computes it: every rank holds the same weights, takes its own slice of
each global batch (per-GPU batch x world), and the gradients are averaged over ranks before
the optimizer step, so every rank applies the same update. The average is one all-reduce of
the flattened trainable gradients per optimizer step (after gradient accumulation), not
DDP's per-bucket all-reduces during backward: the families call their denoiser directly,
which the DDP wrapper would hide. For LoRA the gradients are a few MB and the difference is
small (bench/ measures scaling). A full fine-tune that needs its reduction overlapped with
backward, or its weights spread over GPUs, uses the fsdp2 strategy (job/train/fsdp.py), which
reduce-scatters during backward instead.

Random draws of a step (noise, timesteps, caption dropout) are drawn for the whole global
batch from the shared seeded generator, and each rank keeps its slice: the run is the same
as one process with the global batch, whatever the number of ranks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from job.errors import PeerLost
from job.log import get_logger


@dataclass(frozen=True)
class Topology:
    """This process's place among the job's processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes the shared outputs (metrics, summary, checkpoints, images)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


_current = Topology()


def launched_rank() -> int:
    """This process's rank as the launcher (accelerate launch, torchrun) set it, before any
    process group exists: 0 when launched alone."""
    return int(os.environ.get("RANK", "0") or 0)


def set_topology(topology: Topology) -> None:
    """Record the topology (run.py, after accelerate set up the process group)."""
    global _current
    _current = topology


def topology() -> Topology:
    """The topology of this process (one process until set_topology)."""
    return _current


def _local(drawn: torch.Tensor, local: int, device: torch.device | None) -> torch.Tensor:
    t = _current
    return to_device(drawn[t.rank * local:(t.rank + 1) * local], device)


def to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """`tensor` (on the CPU) on `device` without a host-device sync: a copy from pageable
    memory waits for the GPU to finish its queued work, a copy from pinned memory is queued
    behind it. torch's pinned-memory cache keeps the buffer until the copy has run."""
    if device is None or torch.device(device).type != "cuda":
        return tensor if device is None else tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator,
          dtype: torch.dtype = torch.float32,
          device: torch.device | None = None) -> torch.Tensor:
    """torch.randn of a per-rank batch `shape`, drawn for the global batch (on the CPU
    generator, so every device draws the same numbers) and sliced; on `device` if given."""
    shape = tuple(shape)
    drawn = torch.randn((shape[0] * _current.world, *shape[1:]), generator=generator,
                        dtype=dtype)
    return _local(drawn, shape[0], device)


def rand(size: int, generator: torch.Generator,
         device: torch.device | None = None) -> torch.Tensor:
    """torch.rand of `size` per-rank samples, drawn for the global batch and sliced."""
    return _local(torch.rand(size * _current.world, generator=generator), size, device)


def randint(low: int, high: int, size: int, generator: torch.Generator,
            device: torch.device | None = None) -> torch.Tensor:
    """torch.randint of `size` per-rank samples, drawn for the global batch and sliced."""
    return _local(torch.randint(low, high, (size * _current.world,), generator=generator),
                  size, device)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over ranks (one flattened all-reduce)."""
    if not _current.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if len(grads) != len(params):
        # A parameter without a gradient on this rank gets zeros, so every rank reduces
        # the same buffer layout.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    flat /= _current.world
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` down to a total 2-norm of at most `max_norm` (inf: no
    clipping); returns the norm before clipping, a plain tensor. Sharded (DTensor) gradients'
    norm is a DTensor whose full value is reduced over ranks: every rank gets the whole
    model's norm, so the logged value and the non-finite check agree across ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def agree(loss: torch.Tensor, stop: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over ranks, how many ranks were told to stop), as device scalars: one small
    all-reduce, so every rank logs the same loss and stops at the same step. The caller
    reads them with its other values of the step, in one copy to the host."""
    flag = torch.tensor(float(stop), dtype=torch.float64)  # on the CPU: no copy alone
    if not _current.distributed:
        return loss, flag
    values = torch.stack([loss.detach().to(torch.float64), to_device(flag, loss.device)])
    _collective(dist.all_reduce, values, op=dist.ReduceOp.SUM)
    return values[0] / _current.world, values[1]


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank."""
    if not _current.distributed:
        return flag
    value = torch.tensor([float(flag)], device=device)
    _collective(dist.broadcast, value, src=0)
    return bool(value[0] > 0)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (every rank gets the same answer)."""
    if not _current.distributed:
        return flag
    value = torch.tensor([float(flag)], device=_collective_device())
    _collective(dist.all_reduce, value, op=dist.ReduceOp.MAX)
    return bool(value[0] > 0)


def broadcast_object(value: object) -> object:
    """Rank 0's `value` (picklable) on every rank."""
    if not _current.distributed:
        return value
    box = [value]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    """Where a collective's tensors live: NCCL's on this process's GPU, gloo's on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def close_process_group(finished: bool, timeout_s: float,
                        should_stop: Callable[[], bool] = lambda: False) -> None:
    """Leave the process group before the interpreter exits, where its teardown raced with a
    peer's exit (a finished gloo rank died of SIGABRT).

    Every rank reports its end in the process group's store; a failed one (a peer may still
    be inside a collective) then exits as it is. A finished one waits until every rank has
    ended (a data-parallel rank 1 ends before rank 0's final validation and export), at most
    `timeout_s` and not past a stop signal, and then leaves the group, unless a rank failed.
    The wait polls counts in the store rather than a collective barrier, so a rank whose wait
    ran out holds up no later one (an NCCL barrier would wait out its whole timeout for a
    peer that left) and a failed rank releases the others at once."""
    if not (_current.distributed and dist.is_initialized()):
        return
    log, started = get_logger(), time.monotonic()
    # Keys of this launch attempt: an elastic agent keeps its store across restarts.
    key = f"tunejob/end/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    why = None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=30))  # each call below is one quick exchange
        if not finished:
            store.add(f"{key}/failed", 1)  # before arriving: whoever sees all arrive sees it
            store.add(f"{key}/arrived", 1)
            return
        store.add(f"{key}/arrived", 1)
        why = _wait(lambda: store.add(f"{key}/arrived", 0) >= _current.world, timeout_s,
                    should_stop)
        if why is None and store.add(f"{key}/failed", 0):
            why = "another rank failed"
        store.add(f"{key}/released", 1)  # done with the store
        if why is None and _current.main and \
                os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
            # Rank 0's process serves the store (no launcher's agent does): it stays until
            # every rank is done with it.
            _wait(lambda: store.add(f"{key}/released", 0) >= _current.world, 10, should_stop)
    except (RuntimeError, ValueError, dist.DistError) as err:
        if not finished:
            return
        why = f"the process group's store failed ({_said(err)})"
    if why is None:
        try:
            dist.destroy_process_group()
        except (RuntimeError, dist.DistError) as err:
            why = f"destroy_process_group failed ({_said(err)})"
    if why is not None:
        # The run's outcome stands; only the tidy exit is given up.
        log.warning("process_group_left_open", reason=why)
        return
    log.info("process_group_closed", waited_s=round(time.monotonic() - started, 2))


def _wait(done: Callable[[], bool], timeout_s: float, should_stop: Callable[[], bool]
          ) -> str | None:
    """Poll `done` until it holds (None), a stop signal, or `timeout_s` (why not)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if should_stop():
            return "stopped by signal while waiting for the other ranks to end"
        if time.monotonic() > deadline:
            return f"the other ranks did not end within {timeout_s:g} s (distributed.timeout_s)"
        time.sleep(0.1)
    return None


def _collective(collective, *args, **kwargs) -> None:
    """Run a collective; a failure or timeout (a peer process died or hangs) becomes
    PeerLost: exit 143, so the scheduler's retry resumes from the last checkpoint."""
    try:
        collective(*args, **kwargs)
    except (RuntimeError, dist.DistError) as err:
        raise PeerLost(f"rank {_current.rank}: a collective with the other processes failed "
                       f"({_said(err)})",
                       "another process of the job died or hangs; the retry resumes from the "
                       "last periodic checkpoint (none is written mid-step)") from None


def _said(err: BaseException) -> str:
    """An error's type and the first line of its text (NCCL and gloo errors run long)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
