"""Which records each rank reads, in which order, per epoch. State is two integers.

The order of epoch e is a pure function of (seed, e): a permutation for training, the record
order for evaluation. Two ways to split it across world_size ranks:

- padded (training, and anything that shuffles or drops the last batch): the order is padded
  by wrapping around to a multiple of world_size and dealt round-robin, so every rank gets a
  disjoint share of the same length and therefore the same number of batches: a rank with
  fewer batches would hang the others in the per-step gradient allreduce.
- exact (evaluation: no shuffle, no drop_last): rank r takes its own contiguous slice
  [r*N//W, (r+1)*N//W). Shares differ by at most one record, nothing is counted twice, so the
  summed accuracy is over exactly N images. Ranks may then have different batch counts (or none
  when world_size > N); evaluation has no per-batch collective, only one final sum.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

__all__ = ["Sampler"]


class Sampler:
    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 pad: Optional[bool] = None):
        """`pad` None = pad when shuffling or dropping the last batch (training), split exactly
        otherwise (evaluation)."""
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1 (got %d)" % batch_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need 0 <= rank < world_size (got rank=%d, world_size=%d)"
                             % (rank, world_size))
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.pad = bool(shuffle or drop_last) if pad is None else bool(pad)
        if self.pad:
            self.per_rank = math.ceil(num_samples / world_size)
            self._start = self._stop = None
        else:
            self._start = rank * num_samples // world_size
            self._stop = (rank + 1) * num_samples // world_size
            self.per_rank = self._stop - self._start
        if drop_last:
            self.num_batches = self.per_rank // batch_size
            if self.num_batches == 0:
                raise ValueError(
                    "batch_size %d is larger than this rank's %d samples and drop_last is on: no "
                    "batch would be produced. Lower the batch size or set drop_last=False."
                    % (batch_size, self.per_rank))
        else:
            self.num_batches = math.ceil(self.per_rank / batch_size)
        self._cache: Tuple[Optional[int], Optional[np.ndarray]] = (None, None)

    def __len__(self) -> int:
        return self.num_batches

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's record indices for the epoch, in order (length per_rank)."""
        cached_epoch, cached = self._cache
        if cached_epoch == epoch and cached is not None:
            return cached
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.pad:
            total = self.per_rank * self.world_size
            # np.resize repeats the order as often as needed (world_size may exceed 2x the data)
            order = np.resize(order, total)
            mine = order[self.rank::self.world_size]
        else:
            mine = order[self._start:self._stop]
        self._cache = (epoch, mine)
        return mine

    def batch(self, epoch: int, b: int) -> np.ndarray:
        if not 0 <= b < self.num_batches:
            raise IndexError("batch %d out of range (%d per epoch)" % (b, self.num_batches))
        return self.indices(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def batch_at(self, step: int) -> Tuple[int, np.ndarray]:
        """(epoch, record indices) of global batch `step` of this rank's endless stream:
        epoch = step // batches per epoch. One integer is the whole position."""
        if step < 0 or self.num_batches == 0:
            raise IndexError("no batch %d (%d per epoch)" % (step, self.num_batches))
        epoch, b = divmod(step, self.num_batches)
        return epoch, self.batch(epoch, b)
