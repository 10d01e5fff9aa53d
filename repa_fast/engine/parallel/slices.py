"""The EMA of a replicated model sharded over ranks: DDP and ZeRO-1/2 keep the full fp32 parameters on every rank, so
rank r can average its own 1/world slice of each of them and skip the rest.

Layout: a trainable tensor of n elements is cut into ``world`` contiguous slices of k = ceil(n / world) elements,
rounded up to a multiple of 4 (16-byte aligned, so the EMA kernel's vector loads apply), the last ones shorter or
empty. Rank r updates ``param.view(-1)[r k : (r + 1) k]`` into its own fp32 shadow: 1/world of the per-step EMA
traffic and memory. The average is elementwise, so the slices are bit for bit the full EMA's. A full tensor is
assembled only to save or preview (one all-gather per tensor, every rank calls it); a checkpoint's full EMA is cut
back into slices on load (no communication: every rank read the file).
"""

import torch
import torch.distributed as dist
import torch.nn as nn

from repa_fast.engine.ema import EMA, FullReplica, ShardedEMA

ALIGN = 4  # elements: slice boundaries on 16-byte boundaries of fp32 tensors


def slice_size(numel: int, world: int) -> int:
    """k: elements per rank of an n-element tensor (the last ranks' slices are shorter or empty)."""
    k = -(-numel // world)
    return -(-k // ALIGN) * ALIGN


def slice_bounds(numel: int, rank: int, world: int) -> tuple[int, int]:
    k = slice_size(numel, world)
    start = min(rank * k, numel)
    return start, min(start + k, numel)


def all_gather_slices(local: torch.Tensor, k: int, numel: int) -> torch.Tensor:
    """Collective: the flat tensor of ``numel`` elements whose rank-r slice (k elements, the last ones zero-padded) is
    rank r's ``local``, on every rank."""
    world = dist.get_world_size()
    part = local.detach().float().reshape(-1)
    if part.numel() < k:
        part = torch.cat([part, part.new_zeros(k - part.numel())])
    out = torch.empty(k * world, dtype=torch.float32, device=part.device)
    dist.all_gather_into_tensor(out, part.contiguous())
    return out[:numel]


def replicated_ema(model: nn.Module, rank: int, world: int):
    """The EMA for a backend whose every rank holds the full parameters: this rank's slices (``ShardedEMA``), or a
    full ``EMA`` on one process or when a parameter is not contiguous (no flat view to slice)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if world == 1 or not all(p.is_contiguous() for _, p in named):
        return EMA(model)
    params = dict(named)
    names = [n for n, _ in named]
    bounds = {n: slice_bounds(p.numel(), rank, world) for n, p in named}
    # Views of the parameters' storages, taken once: DDP never moves them, ZeRO-1/2 points them into its flat
    # buffers at initialisation (before this), then updates those in place.
    views = [params[n].detach().view(-1)[slice(*bounds[n])] for n in names]

    def gather(name: str, local: torch.Tensor) -> torch.Tensor:
        p = params[name]
        return all_gather_slices(local, slice_size(p.numel(), world), p.numel()).view(p.shape).cpu()

    def local_slice(name: str, full: torch.Tensor) -> torch.Tensor:
        return full.reshape(-1)[slice(*bounds[name])]

    return ShardedEMA(names, lambda: views, gather, local_slice, FullReplica(model))
