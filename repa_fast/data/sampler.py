"""A resumable distributed sampler with the reference's global-batch composition.

Epoch e uses the permutation ``perm_e = numpy PCG64(SeedSequence([seed, e])).permutation(N)``. Global batch b of
the epoch is ``perm_e[start + b G : start + (b + 1) G]`` (G = global batch); rank r takes its contiguous slice
``[r L : (r + 1) L]`` (L = G / world_size). That is how the reference's accelerate-prepared DataLoader splits a
shuffled stream (BatchSamplerShard without split_batches: process r takes local batch number b * world + r);
the permutation stream itself differs (accelerate's seed comes from the global torch RNG). The last incomplete
global batch is dropped (reference: drop_last=True).

Position. The sampler does not count what it yields (DataLoader prefetching runs ahead of training); the loop
calls ``advance()`` once per optimizer step, and ``state_dict()`` then holds (epoch, samples consumed in the
epoch). A resumed sampler starts at that offset of the same permutation, so no sample is repeated or skipped,
with any number of ranks; with a different global batch the remaining samples are simply cut into the new size.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Deterministic, platform-independent permutation for (seed, epoch)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)]))).permutation(
        num_samples
    )


class ResumableDistributedSampler(Sampler[int]):
    """Yields this rank's sample indices from the current position to the end of the epoch."""

    def __init__(self, num_samples: int, global_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the number of processes "
                f"{world_size}; pass a --batch-size that is a multiple of {world_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of "
                f"{global_batch_size}; lower --batch-size"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // world_size
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.epoch = 0
        self.consumed = 0  # samples (all ranks) consumed in the current epoch

    def _remaining_batches(self) -> int:
        return (self.num_samples - self.consumed) // self.global_batch_size

    def local_indices(self) -> np.ndarray:
        """(batches * L,) this rank's indices from the current position to the end of the epoch."""
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        nb, g, lb = self._remaining_batches(), self.global_batch_size, self.local_batch_size
        batches = perm[self.consumed : self.consumed + nb * g].reshape(nb, g)  # (nb, G)
        return batches[:, self.rank * lb : (self.rank + 1) * lb].reshape(-1)  # (nb * L,)

    def __iter__(self):
        # Materialised now, so advance() during this iteration cannot change what it yields.
        return iter(self.local_indices().tolist())

    def __len__(self) -> int:
        return self._remaining_batches() * self.local_batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def advance(self, num_batches: int = 1) -> None:
        """Record ``num_batches`` global batches as trained on; rolls over to the next epoch at its end."""
        for _ in range(int(num_batches)):
            self.consumed += self.global_batch_size
            if self._remaining_batches() == 0:
                self.epoch, self.consumed = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (DistributedSampler-compatible)."""
        self.epoch, self.consumed = int(epoch), 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler state is for a dataset of {state['num_samples']} samples, this one has "
                f"{self.num_samples}; resume with the same dataset"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}; resume "
                "with the same --seed"
            )
        consumed = int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"sampler state has consumed={consumed}, outside [0, {self.num_samples}]")
        self.epoch, self.consumed = int(state["epoch"]), consumed
        if self._remaining_batches() == 0:  # a smaller tail than the new global batch: the epoch is over
            self.epoch, self.consumed = self.epoch + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# What a checkpoint records of its data, and the bad-sample policy (docs/run_directories.md §Data).


def dataset_fingerprint(dataset) -> dict:
    """``{"num_samples", "checksum"}`` of a dataset, stored in each checkpoint: a resume on data whose size or
    checksum differs is refused (engine/trainer.py ``check_data``). The checksum is the packed dataset's sample
    checksum, or a SHA-256 of the REPA folder's file names and labels (cheap: no file is read); None for the
    embedded demo (it cannot change)."""
    import hashlib

    base = getattr(dataset, "base", dataset)  # cached targets wrap the dataset they were made from
    checksum = None
    index = getattr(base, "index", None)
    if isinstance(index, dict) and isinstance(index.get("checksum"), dict):
        checksum = index["checksum"].get("value")
    elif hasattr(base, "image_fnames") and hasattr(base, "feature_fnames"):
        h = hashlib.sha256()
        for name in (*base.image_fnames, "|", *base.feature_fnames):
            h.update(name.encode() + b"\0")
        h.update(np.asarray(base.labels, dtype=np.int64).tobytes())
        checksum = h.hexdigest()
    return {"num_samples": len(dataset), "checksum": checksum}


def bad_sample_limit(budget: float, num_samples: int) -> int:
    """``--bad-sample-budget`` as a count: a value >= 1 is a count, one below 1 a fraction of the epoch."""
    return int(budget) if budget >= 1 else int(budget * num_samples)


class SkipBadSamples:
    """``--on-bad-sample skip``: a sample whose read fails with a DataError (corrupt file, NaN moments, bad label)
    is replaced by the next readable index (idx + 1, idx + 2, ... mod N): deterministic, so a resumed run reads
    exactly what an uninterrupted one reads. Each bad sample is logged once with its path and reason; more than
    ``limit`` distinct bad samples end the run with the last one's error. Permission errors are never skipped.
    With --num-workers W > 0 each loading process counts its own and may skip ceil(limit / W).
    """

    def __init__(self, dataset, limit: int, num_workers: int = 0):
        self.dataset, self.limit = dataset, int(limit)
        self.per_process = -(-self.limit // num_workers) if num_workers > 0 else self.limit
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # resolution, num_classes, latent_shape, path, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int):
        import logging

        from repa_fast.data.common import DataError

        n = len(self.dataset)
        for j in range(n):
            i = (int(idx) + j) % n
            try:
                return self.dataset[i]
            except DataError as e:
                if "permission denied" in str(e):
                    raise
                if i not in self.bad:
                    self.bad.add(i)
                    if len(self.bad) > self.per_process:
                        raise DataError(
                            f"{e} (--on-bad-sample skip: more than {self.limit} bad samples, the "
                            "--bad-sample-budget; fix the data, or raise the budget)"
                        ) from e
                    logging.getLogger("repa_fast").warning("skipped bad sample %d: %s", i, e)
        raise IndexError(f"{getattr(self.dataset, 'path', 'dataset')}: no readable sample")
