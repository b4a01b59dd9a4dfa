"""The compact RAT+ decode cache: only the entries a layer's pattern can still attend to.

Layout of one layer (keys and values alike, ``[B, Hkv, capacity, head_dim]``, post-RoPE)::

    [ sinks: P slots | ring: W + 1 slots | dilated states, appended ... ]

- position ``j < P`` sits in sink slot ``j``;
- position ``j ≥ P`` sits in ring slot ``P + (j − P) % (W + 1)``: the ring holds the last ``W + 1``
  positions, the window of the query being decoded (its own token included);
- when a position leaves the ring and is on the dilated grid (``(j + 1) % D == 0``) it is appended to
  the dilated segment; otherwise it is dropped. Dense (``D = 1``) keeps every position.

The valid entries are always the prefix ``[0, n)``: sinks fill before the ring, and the ring is full
before anything is appended. Attention is order-free, so a decode step is plain attention over that
prefix (:func:`tersa.kernels.ratplus_decode.ratplus_decode`). The layer also keeps the running
recurrent state ``(k̃_{T−1}, ṽ_{T−1})`` before RoPE, in float32, to continue the scan.

Batches share one length: padding is not supported.
"""

from __future__ import annotations

import torch

from tersa.kv.masks import KVPattern, cache_entries

MIN_DILATED_CAPACITY = 16  # first allocation of the dilated segment; it doubles when full


class RatPlusLayerCache:
    """One layer's compact cache under ``pattern``; buffers are allocated on the first insert."""

    def __init__(self, pattern: KVPattern) -> None:
        self.pattern = pattern
        self.tokens = 0  # positions absorbed so far
        self.n_dilated = 0
        self.keys: torch.Tensor | None = None  # [B, Hkv, capacity, d]
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [capacity] int64, the position of each slot
        self.state: torch.Tensor | None = None  # [B, Hkv, 2d] float32: cat(k̃, ṽ) before RoPE

    @property
    def ring_start(self) -> int:
        return self.pattern.sinks

    @property
    def dilated_start(self) -> int:
        return self.pattern.sinks + self.pattern.window + 1

    @property
    def n_valid(self) -> int:
        """Valid entries, the prefix ``[0, n)`` of the buffers."""
        p, w = self.pattern.sinks, self.pattern.window
        return min(p, self.tokens) + min(w + 1, max(self.tokens - p, 0)) + self.n_dilated

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(keys [B, Hkv, n, d], values, positions [n])`` of the valid entries, or None if empty."""
        if self.keys is None or self.tokens == 0:
            return None
        n = self.n_valid
        assert self.values is not None and self.positions is not None
        return self.keys[:, :, :n], self.values[:, :, :n], self.positions[:n]

    def kv_bytes(self) -> int:
        """Bytes of the valid key/value entries plus the recurrent state (not the spare capacity)."""
        if self.keys is None:
            return 0
        b, h, _, d = self.keys.shape
        entry = 2 * b * h * d * self.keys.element_size()
        state = 0 if self.state is None else self.state.numel() * self.state.element_size()
        return self.n_valid * entry + state

    # ------------------------------------------------------------------------------ updates

    def _allocate(self, like: torch.Tensor, dilated: int) -> None:
        b, h, _, d = like.shape
        cap = self.dilated_start + max(MIN_DILATED_CAPACITY, dilated)
        self.keys = like.new_zeros(b, h, cap, d)
        self.values = like.new_zeros(b, h, cap, d)
        self.positions = torch.full((cap,), -1, dtype=torch.long, device=like.device)

    def _reserve(self, dilated: int) -> None:
        """Grow the dilated segment (doubling) so that it holds ``dilated`` entries."""
        assert self.keys is not None and self.values is not None and self.positions is not None
        need = self.dilated_start + dilated
        cap = self.keys.shape[2]
        if need <= cap:
            return
        new_cap = max(need, self.dilated_start + 2 * (cap - self.dilated_start))
        grow = new_cap - cap
        pad = self.keys.new_zeros(*self.keys.shape[:2], grow, self.keys.shape[3])
        self.keys = torch.cat([self.keys, pad], 2)
        self.values = torch.cat([self.values, pad], 2)
        self.positions = torch.cat([self.positions, self.positions.new_full((grow,), -1)])

    def _slot(self, j: int) -> int:
        p = self.pattern.sinks
        return j if j < p else p + (j - p) % (self.pattern.window + 1)

    def append_one(self, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> None:
        """Absorb the next position: ``k``, ``v`` ``[B, Hkv, 1, d]`` (post-RoPE), ``state`` ``[B, Hkv, 2d]``."""
        if self.keys is None:
            self._allocate(k, 0)
        assert self.keys is not None and self.values is not None and self.positions is not None
        j = self.tokens
        slot = self._slot(j)
        evicted = j - self.pattern.window - 1  # the position whose ring slot j takes
        d = self.pattern.dilation
        # the ring is full from j = P + W + 1 on; the slot's old position leaves it
        leaving = j >= self.pattern.sinks and evicted >= self.pattern.sinks
        if leaving and d is not None and (evicted + 1) % d == 0:
            self._reserve(self.n_dilated + 1)
            dst = self.dilated_start + self.n_dilated
            self.keys[:, :, dst] = self.keys[:, :, slot]
            self.values[:, :, dst] = self.values[:, :, slot]
            self.positions[dst] = evicted
            self.n_dilated += 1
        self.keys[:, :, slot] = k[:, :, 0]
        self.values[:, :, slot] = v[:, :, 0]
        self.positions[slot] = j
        self.tokens = j + 1
        self.state = state

    def append_many(self, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None) -> None:
        """Absorb ``T`` positions at once: ``k``, ``v`` ``[B, Hkv, T, d]`` (post-RoPE).

        Rebuilds the buffers from the current entries and the new ones (the prefill path).
        """
        t_new = k.shape[2]
        if t_new == 0:
            return
        old = self.entries()
        start = self.tokens
        new_pos = torch.arange(start, start + t_new, device=k.device)
        if old is None:
            all_k, all_v, all_pos = k, v, new_pos
        else:
            all_k, all_v = torch.cat([old[0], k], 2), torch.cat([old[1], v], 2)
            all_pos = torch.cat([old[2], new_pos])
        total = start + t_new
        p, w, d = self.pattern.sinks, self.pattern.window, self.pattern.dilation
        in_ring = (all_pos >= p) & (all_pos >= total - w - 1)
        dilated = (all_pos >= p) & ~in_ring
        dilated &= (all_pos + 1) % d == 0 if d is not None else torch.zeros_like(dilated)
        sinks = all_pos < p
        dil_pos = all_pos[dilated]
        order = torch.argsort(dil_pos)
        n_dil = int(dil_pos.numel())
        self._allocate(k, n_dil)
        assert self.keys is not None and self.values is not None and self.positions is not None
        for mask, slots in (
            (sinks, all_pos[sinks]),
            (in_ring, p + (all_pos[in_ring] - p) % (w + 1)),
        ):
            self.keys[:, :, slots] = all_k[:, :, mask]
            self.values[:, :, slots] = all_v[:, :, mask]
            self.positions[slots] = all_pos[mask]
        dst = torch.arange(self.dilated_start, self.dilated_start + n_dil, device=k.device)
        self.keys[:, :, dst] = all_k[:, :, dilated][:, :, order]
        self.values[:, :, dst] = all_v[:, :, dilated][:, :, order]
        self.positions[dst] = dil_pos[order]
        self.n_dilated = n_dil
        self.tokens = total
        self.state = state
        assert self.n_valid == cache_entries(total, self.pattern)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        for name in ("keys", "values", "state"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))


class RatPlusCache:
    """The decode cache of a whole model: one :class:`RatPlusLayerCache` per layer.

    ``generate`` passes it between steps (the model builds one on the first call with
    ``use_cache=True``). :meth:`kv_bytes` reports the memory the pattern needs.
    """

    is_compileable = False

    def __init__(self, patterns: list[KVPattern]) -> None:
        self.layers = [RatPlusLayerCache(p) for p in patterns]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> RatPlusLayerCache:
        return self.layers[layer_idx]

    @property
    def is_linear(self) -> list[bool]:
        """For ``generate``: no layer is a pure linear (state-only) cache."""
        return [False] * len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens absorbed so far."""
        return self.layers[layer_idx].tokens

    def kv_bytes(self) -> int:
        """Bytes of every layer's valid entries plus recurrent states."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a RAT+ cache cannot be cropped: dropped window entries and the recurrent state are "
            "gone; re-run the prefix instead (assisted decoding is not supported)"
        )
