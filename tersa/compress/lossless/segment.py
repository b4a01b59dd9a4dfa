"""What a tensor codec produces: its parameters and an ordered list of byte segments."""

from __future__ import annotations

from dataclasses import dataclass, field

# Segment kinds: "raw" (the tensor's bytes), "table" (frequency tables), "rows" / "cols" (packed
# row and column classes), "ans" (one ANS chunk of ``symbols`` symbols), "bits" (packed raw bits).
KINDS = ("raw", "table", "rows", "cols", "ans", "bits")


@dataclass
class Segment:
    """One stored byte range; ``symbols`` counts the symbols of an ``ans`` chunk (else 0)."""

    kind: str
    data: bytes
    symbols: int = 0


@dataclass
class Encoded:
    """A coded tensor: ``codec`` ("raw", "float" or "int"), its integer ``params`` and segments."""

    codec: str
    params: dict[str, int] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(s.data) for s in self.segments)
