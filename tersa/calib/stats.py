"""Per-channel activation statistics gathered with forward hooks during calibration."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tersa.errors import DataError


@dataclass
class ChannelStats:
    """Running per-channel ``min`` / ``max`` ``[C]`` of a tensor's last dimension."""

    name: str
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    tokens: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    keep_tokens: int = 0

    def update(self, x: torch.Tensor) -> None:
        """Fold in ``x`` ``[..., C]``; refuses NaN and infinite values."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # [N, C]
        if not torch.isfinite(flat).all():
            raise DataError(
                f"non-finite activations (NaN or inf) at the input of '{self.name}' during "
                "calibration; the model overflows on this data — use float32 or bfloat16 "
                "(float16 overflows easily) and check the checkpoint"
            )
        lo, hi = flat.amin(0), flat.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.tokens += flat.shape[0]
        room = self.keep_tokens - sum(s.shape[0] for s in self.samples)
        if room > 0:
            self.samples.append(flat[:room].cpu())

    @property
    def absmax(self) -> torch.Tensor:
        assert self.min is not None and self.max is not None, f"no data observed for {self.name}"
        return torch.maximum(self.max.abs(), self.min.abs())

    def sample(self) -> torch.Tensor:
        """The first ``keep_tokens`` observed tokens ``[N, C]`` (float32, CPU)."""
        return torch.cat(self.samples) if self.samples else torch.empty(0)


@contextmanager
def observe_inputs(
    modules: dict[str, nn.Module], keep_tokens: int = 0
) -> Iterator[dict[str, ChannelStats]]:
    """Record the per-channel range of each module's first input while the block runs.

    :param modules: ``{name: module}``; the name appears in error messages.
    :param keep_tokens: also keep the first ``keep_tokens`` input rows of each (for searches).
    """
    stats = {name: ChannelStats(name, keep_tokens=keep_tokens) for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple, kwargs: dict, _s: ChannelStats = stats[name]) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            _s.update(x)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
