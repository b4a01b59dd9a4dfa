"""Which keys a query sees under a RAT+ inference pattern, and how many entries its cache holds.

A pattern has three parts, unioned (the predicate of the official RAT+ code, wimh966/rat-plus
``merge_lastt.py``). Query ``t`` sees key ``j ≤ t`` when

- **dilated** ``D``: ``(j + 1) % D == 0``, an absolute grid: the recurrent state at the end of each
  block of ``D`` tokens (positions ``D−1, 2D−1, ...``), so a state never leaves the grid and the
  decode cache only appends. ``D = 1`` is dense attention; ``None`` turns dilation off;
- **local window** ``W``: ``t − j ≤ W``, the current token and the ``W`` before it (so ``W = 0`` is
  the current token alone, whose key is mostly history once the gate is near 1);
- **sinks** ``P``: ``j < P``, the first ``P`` tokens.

Positions are sequence indices (0-based); patterns take no account of padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

DEFAULT_WINDOW = 4  # with W = 0 the current token's own key is blurred by its history


@dataclass(frozen=True)
class KVPattern:
    """One layer's inference pattern.

    :param dilation: ``D``: attend to the states at positions ``j`` with ``(j + 1) % D == 0``;
        1 = dense, None = no dilated states (window and sinks only).
    :param window: ``W``: the current token and the ``W`` tokens before it.
    :param sinks: ``P``: the first ``P`` tokens.
    """

    dilation: int | None = 1
    window: int = DEFAULT_WINDOW
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.dilation is not None and (not isinstance(self.dilation, int) or self.dilation < 1):
            raise ValueError(f"dilation must be an int >= 1 or None, got {self.dilation!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    @property
    def dense(self) -> bool:
        """True when every past key is seen (``D = 1``)."""
        return self.dilation == 1

    @classmethod
    def from_value(cls, value: KVPattern | dict[str, Any] | str | None) -> KVPattern:
        """A pattern from a ``KVPattern``, a dict of its fields, ``"dense"`` or None (dense)."""
        if value is None or value == "dense":
            return cls()
        if isinstance(value, KVPattern):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"dilation", "window", "sinks"}
            if unknown:
                raise ValueError(
                    f"unknown KV pattern keys {sorted(unknown)}; allowed: dilation, window, sinks"
                )
            return cls(**value)
        raise ValueError(f"a KV pattern is a dict, 'dense' or None, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_patterns(value: Any, num_layers: int) -> list[KVPattern]:
    """Per-layer patterns from one pattern (every layer) or a list with one entry per layer."""
    if isinstance(value, list | tuple):
        if len(value) != num_layers:
            raise ValueError(
                f"a per-layer KV pattern list needs {num_layers} entries, got {len(value)}"
            )
        return [KVPattern.from_value(v) for v in value]
    return [KVPattern.from_value(value)] * num_layers


def sees(t: int, j: int, pattern: KVPattern) -> bool:
    """Whether query position ``t`` attends key position ``j`` (brute force, for tests)."""
    if j > t:
        return False
    dilated = pattern.dilation is not None and (j + 1) % pattern.dilation == 0
    return dilated or t - j <= pattern.window or j < pattern.sinks


def pattern_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, pattern: KVPattern) -> torch.Tensor:
    """Boolean mask ``[Tq, Tk]``: True where query position ``q_pos[i]`` sees key ``k_pos[j]``.

    :param q_pos: query positions ``[Tq]`` (int).
    :param k_pos: key positions ``[Tk]`` (int).
    """
    q, k = q_pos[:, None], k_pos[None, :]
    keep = (k <= q) & ((q - k <= pattern.window) | (k < pattern.sinks))
    if pattern.dilation is not None:
        keep |= (k <= q) & ((k + 1) % pattern.dilation == 0)
    return keep


def cache_entries(tokens: int, pattern: KVPattern) -> int:
    """Entries the compact decode cache holds after ``tokens`` tokens.

    The cache keeps ``min(P, T)`` sinks, a ring of the last ``W + 1`` non-sink positions (the
    next query's window plus the slot its own token takes), and the dilated states that left the
    ring: positions ``j`` in ``[P, T − W − 1)`` with ``(j + 1) % D == 0``. At most
    ``P + W + 1 + ⌊T/D⌋``; ``T`` when dense.
    """
    p, w, d = pattern.sinks, pattern.window, pattern.dilation
    sinks = min(p, tokens)
    ring = min(w + 1, max(tokens - p, 0))
    evicted_end = tokens - w - 1  # positions [P, evicted_end) have left the ring
    dilated = 0
    if d is not None and evicted_end > p:
        dilated = evicted_end // d - p // d  # multiples of D in (P, evicted_end]
    return sinks + ring + dilated
