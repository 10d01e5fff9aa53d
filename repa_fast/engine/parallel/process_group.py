"""The process group: its lifetime (init, teardown), bounded timeouts, and telling a dead peer from a bug.

A rank that died or hangs leaves the others waiting in a collective; with the bounded timeout they give up after
REPA_FAST_DIST_TIMEOUT seconds (no hang), and ``DistributedBackend.peer_failure`` turns that error into a
``PeerFailure`` whose message says where to resume from. ``DistributedBackend`` is the base of every multi-process
backend (ddp, fsdp, deepspeed): the collectives, setup and teardown they share.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from repa_fast.engine.parallel.base import Backend, env_world
from repa_fast.errors import UserError

# Read when a process group is created, so tests can lower it through the environment.
DEFAULT_TIMEOUT_S = 60


def launch_env(default_local_rank: int = 0) -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of this process, as torchrun, the deepspeed launcher, ``accelerate launch`` and a
    manual launch all set them (0, 1, ``default_local_rank`` when unset). Everything outside the backends asks here
    (repa_fast.cli, errors, build, tools/, ``make_backend``); the variables are parsed once, by ``base.env_world``,
    which the base ``Backend`` calls itself (it cannot import this module, which derives from it).
    ``default_local_rank`` lets a tool that spreads its own worker processes over the GPUs (``--workers N``, no
    launcher) pick the GPU by worker index."""
    rank, world, local = env_world()
    return rank, world, local if "LOCAL_RANK" in os.environ else default_local_rank


# What torch's env:// rendezvous reads; every launcher (torchrun, deepspeed, accelerate launch) sets all of them.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_launcher_env() -> None:
    """A multi-process environment is complete: WORLD_SIZE > 1 alone (set by hand, or left over from another job)
    would otherwise end in torch's rendezvous traceback. A UserError naming what is missing and both ways out."""
    world = launch_env()[1]
    missing = [v for v in LAUNCHER_VARS if v not in os.environ]
    if world > 1 and missing:
        raise UserError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: a "
            f"launcher sets all of {', '.join(LAUNCHER_VARS)}. Start the command under one (torchrun "
            f"--nproc_per_node {world} ..., deepspeed or accelerate launch), or unset WORLD_SIZE for one process"
        )


def dist_timeout_s() -> int:
    return int(os.environ.get("REPA_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def dist_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=dist_timeout_s())


class PeerFailure(RuntimeError):
    """Another process died or stopped answering; this one stopped cleanly. The message says how to resume."""


# Messages of collectives that failed because a peer vanished (gloo, NCCL, the TCP store) or timed out.
_PEER_SIGNS = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "nccl",
    "gloo",
    "socket",
    "tcpstore",
    "by peer",
)

_PRIVATE_STORES: list[str] = []  # file stores of launcher-less single-process groups, removed at shutdown


@contextlib.contextmanager
def launched_command():
    """(rank, world, device) of a command run under torchrun (or alone), with its process group for the duration:
    the sampling and evaluation commands' launch, written once. The device is cuda:LOCAL_RANK when CUDA is there."""
    check_launcher_env()
    rank, world, local_rank = launch_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # Triton kernels and NCCL use the current device
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank, world, device
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_process_group(device: torch.device) -> None:
    """One process group for everything, with a bounded timeout: a dead or hung peer makes collectives fail after
    REPA_FAST_DIST_TIMEOUT seconds (gloo honours it per operation; NCCL's watchdog aborts the communicator)."""
    if dist.is_initialized():
        return
    check_launcher_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ and launch_env()[1] == 1:
        # A single process not started by a launcher (e.g. --parallel deepspeed on one GPU): a private file store.
        import tempfile

        fd, store = tempfile.mkstemp(prefix="repa_fast-pg-")
        os.close(fd)
        _PRIVATE_STORES.append(store)
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=dist_timeout())
        return
    dist.init_process_group(backend, timeout=dist_timeout())


def bound_process_groups() -> int:
    """Give every process group this rank belongs to the bounded timeout. Groups that libraries create themselves
    (DeepSpeed clones the world group for ZeRO's reductions) get torch's default otherwise: 30 min for gloo, which a
    hung peer would make the survivors wait (measured: a SIGSTOPped rank under ZeRO-2 held the other past 120 s).
    Returns the number of groups set. The group registry is private (``_world.pg_map``); without it only the default
    group, which ``init_process_group`` already bounded, is covered."""
    if not dist.is_initialized():
        return 0
    timeout = dist_timeout()
    registry = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None) or {}
    n = 0
    for group in list(registry):
        if dist.get_rank(group) >= 0:  # -1: this rank is not a member
            dist.set_timeout(timeout, group)
            n += 1
    return n


def shutdown_process_group(clean: bool = True) -> None:
    """Always tear the group down: DeepSpeed/gloo on CPU aborts at exit in ~3/16 runs otherwise. After a failure the
    barrier is skipped: a dead peer would only make it wait for the timeout once more."""
    if not dist.is_initialized():
        return
    if clean:
        try:
            dist.barrier()
        except Exception:  # a peer died during teardown: still destroy our side
            pass
    dist.destroy_process_group()
    while _PRIVATE_STORES:
        with contextlib.suppress(OSError):
            os.remove(_PRIVATE_STORES.pop())


class DistributedBackend(Backend):
    """Collectives, process-group setup and teardown shared by every multi-process backend."""

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        init_process_group(self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def all_reduce_mean(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def gather_objects(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        dist.barrier()

    def peer_failure(self, exc, last_checkpoint=None):
        if isinstance(exc, PeerFailure):
            return exc
        text = f"{type(exc).__name__}: {exc}"
        is_dist = isinstance(exc, getattr(dist, "DistError", ())) or (
            isinstance(exc, RuntimeError) and any(s in text.lower() for s in _PEER_SIGNS)
        )
        if self.world_size == 1 or not is_dist:
            return None
        first = text.strip().splitlines()[0][:300]
        where = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        return PeerFailure(
            f"rank {self.rank}/{self.world_size} ({self.name}): a collective failed because another process died or "
            f"stopped answering (timeout REPA_FAST_DIST_TIMEOUT={dist_timeout_s()} s): {first}. This process "
            f"stopped; {where}. Relaunch with --resume to continue from it (any number of processes, any backend)."
        )

    def shutdown(self, clean=True):
        shutdown_process_group(clean)
