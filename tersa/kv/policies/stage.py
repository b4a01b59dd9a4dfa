"""The ``kv`` stage: set a KV policy on the model; the export records it and loading applies it.

The policy changes no weight. It goes into the export's ``quantization_config.tersa.kv_policy``
(see :mod:`tersa.export.format`), so ``load_export`` and ``AutoModelForCausalLM.from_pretrained``
(with ``import tersa``) put it back on the loaded model. The stage reports what the policy keeps
and reads per decode step at the recipe's evaluation length (or 4096 tokens without one).

Recipe::

    stages:
      - kv: {policy: quest, budget: 0.125, page: 16}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from tersa.config import STRICT, Float, Int
from tersa.context import StageContext
from tersa.errors import RecipeError
from tersa.kv.policies.apply import apply_kv_policy
from tersa.kv.policies.config import POLICIES, make_policy
from tersa.kv.policies.memory import KVLayout, kv_traffic
from tersa.registry import register_stage

DEFAULT_CONTEXT = 4096  # where the stage reports bytes when the recipe has no evaluation length
PolicyName = Literal["dense", "streaming", "snapkv", "quest", "moba"]


@dataclass(config=STRICT)
class KVStageConfig:
    """One KV policy and its budget; options a policy does not take must stay unset."""

    policy: Annotated[PolicyName, Field(description=", ".join(POLICIES))]
    budget: Annotated[
        Float | Int, Field(description="fraction of the keys in (0, 1] or a token count >= 1")
    ] = 1.0
    dense_layers: Annotated[Int, Field(ge=0, description="first layers kept dense")] = 0
    sinks: Annotated[Int | None, Field(ge=0, description="streaming: sink tokens (4)")] = None
    window: Annotated[Int | None, Field(ge=1, description="snapkv: observation window (32)")] = None
    pool: Annotated[Int | None, Field(ge=1, description="snapkv: vote pooling kernel (5)")] = None
    page: Annotated[Int | None, Field(ge=1, description="quest: tokens per page (16)")] = None
    block: Annotated[Int | None, Field(ge=1, description="moba: tokens per block (64)")] = None

    def __post_init__(self) -> None:
        try:  # an option this policy does not take, a bad budget: fail with the recipe's checks
            make_policy(self.policy_dict())
        except RecipeError as e:
            raise ValueError(str(e)) from None

    def policy_dict(self) -> dict:
        options = {"sinks", "window", "pool", "page", "block"}
        chosen = {k: v for k, v in vars(self).items() if k in options and v is not None}
        return {
            "name": self.policy,
            "budget": self.budget,
            "dense_layers": self.dense_layers,
            **chosen,
        }


@register_stage("kv", KVStageConfig)
def kv_stage(model: nn.Module, cfg: KVStageConfig, ctx: StageContext) -> nn.Module:
    """Set a KV-cache policy (StreamingLLM, SnapKV, Quest, MoBA) for decoding; the export keeps it."""
    policy = apply_kv_policy(model, cfg.policy_dict())
    evaluation = ctx.recipe.evaluation if ctx.recipe is not None else None
    context = evaluation.seq_len if evaluation is not None else DEFAULT_CONTEXT
    traffic = kv_traffic(policy, KVLayout.of(model), context)
    ctx.metrics.update(
        {
            "policy": policy.to_dict(),
            "context": context,
            "kv_fraction_kept": round(traffic.kept_fraction, 4),
            "kv_fraction_read": round(traffic.read_fraction, 4),
        }
    )
    return model
