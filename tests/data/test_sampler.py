"""Resumable distributed sampler: coverage per epoch, reference batch composition, exact resume across world sizes."""

import numpy as np
import pytest
import torch

from repa_fast.data import ResumableDistributedSampler as S
from repa_fast.data.sampler import epoch_permutation


def global_batches(n, g, world, *, seed=0, state=None, steps=None):
    """Concatenate the ranks' local slices step by step, advancing every rank's sampler like the loop does."""
    samplers = [S(n, g, rank=r, world_size=world, seed=seed) for r in range(world)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
    out = []
    while steps is None or len(out) < steps:
        iters = [iter(s) for s in samplers]  # one DataLoader epoch
        local = len(samplers[0]) // samplers[0].local_batch_size
        if local == 0:
            break
        for _ in range(local):
            out.append(np.concatenate([[next(it) for _ in range(g // world)] for it in iters]))
            for s in samplers:
                s.advance()
            if steps is not None and len(out) == steps:
                break
        if steps is None:
            break
    return out, samplers[0].state_dict()


@pytest.mark.parametrize("n,g,world", [(103, 12, 1), (103, 12, 3), (96, 8, 4), (50, 50, 2)])
def test_one_epoch_covers_each_sample_once_minus_the_dropped_tail(n, g, world):
    batches, state = global_batches(n, g, world, seed=5)
    seen = np.concatenate(batches)
    assert len(batches) == n // g and len(seen) == len(np.unique(seen)) == (n // g) * g
    perm = epoch_permutation(n, 5, 0)
    np.testing.assert_array_equal(seen, perm[: (n // g) * g])  # the tail perm[(n // g) g:] is dropped
    assert state["epoch"] == 1 and state["consumed"] == 0


def test_rank_slices_are_contiguous_parts_of_the_global_batch():
    """Rank r gets [r L, (r + 1) L) of every global batch: accelerate's no-split sharding of one shuffled stream."""
    n, g, world = 64, 16, 4
    perm = epoch_permutation(n, 0, 0)
    for r in range(world):
        idx = S(n, g, rank=r, world_size=world).local_indices().reshape(-1, 4)
        np.testing.assert_array_equal(idx, perm.reshape(-1, g)[:, 4 * r : 4 * r + 4])


def test_permutation_depends_on_seed_and_epoch_only():
    a, b = S(100, 10, seed=1), S(100, 10, seed=1)
    np.testing.assert_array_equal(a.local_indices(), b.local_indices())
    assert not np.array_equal(a.local_indices(), S(100, 10, seed=2).local_indices())
    b.set_epoch(1)
    assert not np.array_equal(a.local_indices(), b.local_indices())
    assert sorted(b.local_indices()) == list(range(100))
    # Platform-independent (PCG64 + SeedSequence); pinned so a numpy change cannot silently reshuffle a resume.
    assert epoch_permutation(10, 0, 0).tolist() == np.random.default_rng([0, 0]).permutation(10).tolist()


@pytest.mark.parametrize("world_before,world_after", [(2, 2), (2, 3), (3, 1), (1, 6)])
@pytest.mark.parametrize("stop", [1, 7, 8, 13])
def test_resume_matches_an_uninterrupted_run(world_before, world_after, stop):
    """Steps 0..stop on `world_before` ranks, then resume on `world_after` ranks: same global batches as straight."""
    n, g = 103, 12  # 8 batches per epoch: stop=8 resumes exactly at an epoch boundary, 13 in epoch 2
    straight, _ = global_batches(n, g, 1, seed=3, steps=20)
    first, state = global_batches(n, g, world_before, seed=3, steps=stop)
    rest, _ = global_batches(n, g, world_after, seed=3, state=state, steps=20 - stop)
    for k, (x, y) in enumerate(zip(straight, first + rest)):
        np.testing.assert_array_equal(x, y, err_msg=f"global batch {k}")


def test_resume_with_a_different_global_batch_neither_repeats_nor_skips():
    n = 100
    first, state = global_batches(n, 12, 2, seed=0, steps=3)  # 36 consumed
    assert state["consumed"] == 36
    rest, state2 = global_batches(n, 16, 4, seed=0, state=state)  # rest of the epoch in batches of 16
    seen = np.concatenate(first + rest)
    assert len(seen) == len(np.unique(seen)) == 36 + (64 // 16) * 16
    np.testing.assert_array_equal(seen, epoch_permutation(n, 0, 0)[:100])
    assert (state2["epoch"], state2["consumed"]) == (1, 0)


def test_dataloader_prefetch_does_not_move_the_position():
    """The DataLoader runs ahead; only advance() counts, so a checkpoint mid-epoch resumes at the trained step."""
    data = torch.arange(40)
    sampler = S(40, 8, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler, num_workers=1, prefetch_factor=4)
    straight = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=8, sampler=S(40, 8, seed=0))]
    got = []
    for k, batch in enumerate(loader):
        got.append(batch.tolist())
        sampler.advance()
        if k == 1:
            state = sampler.state_dict()  # workers have prefetched further by now
            break
    resumed = S(40, 8, seed=0)
    resumed.load_state_dict(state)
    got += [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=8, sampler=resumed)]
    assert got == straight and len(straight) == 5


def test_len_is_the_remaining_local_count():
    s = S(103, 12, rank=1, world_size=3)
    assert len(s) == 8 * 4
    s.advance(3)
    assert len(s) == 5 * 4 and len(list(s)) == 20


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (
            dict(num_samples=100, global_batch_size=10, world_size=3),
            r"global batch size 10 is not divisible by the "
            r"number of processes 3",
        ),
        (dict(num_samples=5, global_batch_size=8), r"5 samples, fewer than one global batch of 8; lower --batch-size"),
        (dict(num_samples=10, global_batch_size=2, rank=2, world_size=2), r"rank 2 is not in \[0, world_size=2\)"),
    ],
)
def test_bad_construction(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        S(**kwargs)


def test_bad_state():
    s = S(100, 10, seed=1)
    with pytest.raises(ValueError, match=r"dataset of 99 samples, this one has 100"):
        s.load_state_dict(dict(S(99, 10, seed=1).state_dict()))
    with pytest.raises(ValueError, match=r"saved with seed 2, this run uses 1; resume with the same --seed"):
        s.load_state_dict(S(100, 10, seed=2).state_dict())
