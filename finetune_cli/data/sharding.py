"""Which images each process reads, and in what order.

Training draws one permutation per epoch from ``(seed, epoch)`` alone and deals it out: with N
processes, rank r takes positions r, r+N, r+2N... so the N processes' k-th batches together are
the k-th batch of one process with N times their batch size. The order depends on nothing else,
so a resumed run draws it again exactly, with any number of processes.

``BalancedDraw`` (data.sampler=balanced) draws the epoch's images with replacement, each with its
class's weight, from ``(seed, epoch)`` alone, and deals them out the same way.

Validation gives each process every N-th image, without padding: summed over the processes, the
loss and the counts are those of a single process's pass over the whole set.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    def __init__(self, n: int, seed: int, rank: int = 0, size: int = 1) -> None:
        self.n, self.seed, self.rank, self.size = n, seed, rank, size
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.size)

    def __iter__(self) -> Iterator[int]:
        """This epoch's share; the next pass draws the next epoch's unless ``set_epoch`` says which."""
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: len(self) * self.size - self.n]  # every process gets as many (a few repeat)
        return iter(order[self.rank :: self.size])


class BalancedDraw(EpochShuffle):
    """As many draws per epoch as there are images, image i drawn with probability proportional to
    ``weights[i]`` (one over its class's count: every class equally often, rare images repeated,
    frequent ones left out some epochs)."""

    def __init__(self, weights: Sequence[float], seed: int, rank: int = 0, size: int = 1) -> None:
        super().__init__(len(weights), seed, rank, size)
        self.weights = torch.as_tensor(weights, dtype=torch.double)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        order = torch.multinomial(self.weights, len(self) * self.size, replacement=True, generator=g).tolist()
        return iter(order[self.rank :: self.size])


class Shard(Sampler[int]):
    """Every ``size``-th index from ``rank``, in order, nothing repeated."""

    def __init__(self, n: int, rank: int = 0, size: int = 1) -> None:
        self.n, self.rank, self.size = n, rank, size

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.size))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.size))
