"""Building blocks for strict config dataclasses.

Configs are pydantic dataclasses with ``extra="forbid"``: a YAML recipe maps 1:1 onto them, an unknown
key or a wrong type is rejected before any work starts. Scalars are strict (``bits: "8"`` is an error,
not a silent coercion); a float field still accepts a YAML integer such as ``1``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Strict

STRICT = ConfigDict(extra="forbid")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
