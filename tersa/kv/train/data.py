"""Training batches: random windows of the token stream, a pure function of (seed, step).

Step ``s`` draws its ``batch_size`` window starts from a generator seeded with ``(seed, s)``, so a
resumed run sees exactly the batches an uninterrupted one would, without any loader state, and
every process of a DDP run draws the same global batch and keeps its own rows of it.
"""

from __future__ import annotations

import torch

from tersa.errors import DataError


def batch_at(
    ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int
) -> torch.Tensor:
    """The global batch of ``step``: ``batch_size`` windows of ``seq_len`` tokens of ``ids``.

    :param ids: the tokenized training text ``[N]`` (int64), ``N > seq_len``.
    :returns: ``[batch_size, seq_len]`` int64; starts uniform in ``[0, N − seq_len]``.
    """
    n = ids.numel()
    if n <= seq_len:
        raise DataError(
            f"the training text has {n} tokens, not more than one sequence of {seq_len}; "
            "lower training.seq_len or give more text"
        )
    gen = torch.Generator().manual_seed((seed << 32) + step)
    starts = torch.randint(0, n - seq_len + 1, (batch_size,), generator=gen)  # [B]
    return ids[starts[:, None] + torch.arange(seq_len)]  # [B, T]


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of a global batch ``[B, T]`` that process ``rank`` of ``world`` trains on."""
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]
