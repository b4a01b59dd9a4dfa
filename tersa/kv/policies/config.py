"""KV policies as configs: one frozen dataclass per policy, an explicit registry, one budget rule.

A policy decides which cached keys a decode-step query attends to. Every policy is configured by
a **budget**: a float in ``(0, 1]`` is a fraction of the keys the query could see (``t + 1`` for a
query at position ``t``; SnapKV, which compresses once, takes it of the prompt), an int ``>= 1``
is a token count. A fraction of 1.0 is dense attention, exactly, for every policy.

- ``streaming`` (StreamingLLM, arXiv 2309.17453): the first ``sinks`` tokens plus the most recent
  ones, up to the budget. Bounded memory; the evicted tokens are gone.
- ``snapkv`` (arXiv 2404.14469): once, at the end of the prompt, the last ``window`` prompt
  queries vote (their attention, summed over the window and pooled over ``pool`` neighbouring
  keys) for the prompt keys each KV head keeps; the window itself and every generated token stay.
- ``quest`` (arXiv 2406.10774): pages of ``page`` tokens, each summarised by its keys' element-wise
  min and max; at every decode step each query head reads its own (current) page plus the pages
  with the highest upper bound ``Σ_i max(q_i m_i, q_i M_i)``. The full cache stays in memory.
- ``moba`` (arXiv 2502.13189): blocks of ``block`` tokens gated by ``q · mean(K_block)``; the top
  blocks per query head, the query's own block always. The full cache stays in memory.

``dense_layers`` keeps the first layers dense (the Quest paper keeps layers 0 and 1).

Quest and MoBA select per query head by default (``heads: query``, as the papers, written for
models without grouped KV heads, do). With grouped KV heads each head of a group then reads its
own pages, so a step reads up to ``Hq/Hkv`` times its budget. ``heads: kv`` sums each page's
scores over the query heads of a KV head and selects once per KV head: a step reads its budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from tersa.errors import RecipeError


def _check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise RecipeError(
            f"budget must be a fraction in (0, 1] or a token count >= 1, got {budget!r}"
        )
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise RecipeError(f"a fractional budget must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise RecipeError(f"a token budget must be >= 1, got {budget}")


@dataclass(frozen=True)
class KVPolicy:
    """Base of every policy: the budget and the dense first layers."""

    name: ClassVar[str] = "dense"
    budget: float | int = 1.0
    dense_layers: int = 0

    # Options that take one of a few words rather than an integer.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        _check_budget(self.budget)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.CHOICES:
                if value not in self.CHOICES[f.name]:
                    allowed = ", ".join(repr(c) for c in self.CHOICES[f.name])
                    raise RecipeError(
                        f"{self.name}.{f.name} must be one of {allowed}, got {value!r}"
                    )
                continue
            if f.name != "budget" and (isinstance(value, bool) or not isinstance(value, int)):
                raise RecipeError(f"{self.name}.{f.name} must be an integer, got {value!r}")
            if f.name != "budget" and value < self.minimum(f.name):
                raise RecipeError(
                    f"{self.name}.{f.name} must be >= {self.minimum(f.name)}, got {value}"
                )

    @staticmethod
    def minimum(field_name: str) -> int:
        """The smallest allowed value of an integer option."""
        return 0 if field_name in {"dense_layers", "sinks"} else 1

    @property
    def is_dense(self) -> bool:
        """True when the policy selects every key (dense, or a budget of 1.0)."""
        return self.name == "dense" or (isinstance(self.budget, float) and self.budget == 1.0)

    def tokens(self, visible: int) -> int:
        """The budget in tokens for a query that could see ``visible`` keys (at least 1)."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * visible))
        return min(self.budget, visible)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options}``: what a recipe or an export's config holds."""
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class DensePolicy(KVPolicy):
    """Every key (the reference every other policy is measured against)."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True)
class StreamingPolicy(KVPolicy):
    """StreamingLLM: ``sinks`` first tokens plus a recent window filling the budget."""

    name: ClassVar[str] = "streaming"
    sinks: int = 4


@dataclass(frozen=True)
class SnapKVPolicy(KVPolicy):
    """SnapKV: prompt keys chosen once by the last ``window`` prompt queries (pooled over ``pool``)."""

    name: ClassVar[str] = "snapkv"
    window: int = 32
    pool: int = 5


@dataclass(frozen=True)
class QuestPolicy(KVPolicy):
    """Quest: per decode step, the pages of ``page`` tokens with the highest key-bound scores,
    chosen per query head or (``heads: kv``) per KV head."""

    name: ClassVar[str] = "quest"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"heads": ("query", "kv")}
    page: int = 16
    heads: str = "query"


@dataclass(frozen=True)
class MobaPolicy(KVPolicy):
    """MoBA: per decode step, the blocks of ``block`` tokens with the highest mean-key gate,
    chosen per query head or (``heads: kv``) per KV head."""

    name: ClassVar[str] = "moba"
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"heads": ("query", "kv")}
    block: int = 64
    heads: str = "query"


POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls for cls in (DensePolicy, StreamingPolicy, SnapKVPolicy, QuestPolicy, MobaPolicy)
}


def make_policy(value: KVPolicy | dict[str, Any] | str | None) -> KVPolicy:
    """A policy from a :class:`KVPolicy`, a name (default options), a dict ``{"name": ..., options}``
    or None (dense). Unknown names and options fail with what is allowed."""
    if isinstance(value, KVPolicy):
        return value
    if value is None:
        return DensePolicy()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise RecipeError(f"a KV policy is a name or a mapping with 'name', got {value!r}")
    options = dict(value)
    name = options.pop("name", None)
    if name not in POLICIES:
        raise RecipeError(f"unknown KV policy {name!r}; allowed: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise RecipeError(
            f"unknown option(s) {', '.join(unknown)} for KV policy '{name}'; "
            f"allowed: {', '.join(allowed)}"
        )
    return cls(**options)
