"""The ``os_plus`` stage (Outlier Suppression+, EMNLP 2023): migrate outlier channels into weights.

Block by block (one block's calibration activations at a time):

1. Hooks record, during the pass that propagates the calibration cache through the block, the
   per-channel range of every group input (the norm output feeding q/k/v, gate/up or fc1) and every
   pair consumer input (o_proj, down_proj) over all tokens, plus their first ``search_tokens`` rows
   (whole sequences). That pass costs as much as the whole search, so there is no second one: the
   block is searched and folded right after it, and the folds are exact in full precision, so the
   outputs already propagated stay valid.
2. Each norm → linears group gets a shift ``z`` (optional) and a scale ``s`` from one threshold
   ``t``, searched (:mod:`tersa.quant.osplus_math`) on the error of the group's quantized output
   against full precision, with the schemes of the quantize stage that follows:

   - the attention group is scored on the attention output ``softmax(QKᵀ)V``, the o_proj input.
     The block itself runs on the sampled sequences (with the keyword arguments the model passed
     it: RoPE tables, masks) while q/k/v are temporarily replaced by modules computing
     ``Q(W·diag(s))·Q((X − z)/s) + b + W·z``, and a pre-hook on o_proj reads its input and stops
     the block. This is family-agnostic: RoPE, GQA, Qwen3's q/k norms and GPT-2's fused ``c_attn``
     all run through the model's own attention code;
   - other groups (the MLP) are scored on their linears' outputs (gate+up, fc1).

   The best ``(s, z)`` folds exactly into the norm and the linears (:func:`migrate_group`), or,
   post-norm, stays on the linears' inputs. BERT's query/key/value read the block input (a
   block-input group): they are observed and scored like any attention group, the norm that
   produced the input (the previous block's last, or the embeddings') only deciding the shift.
3. Scale pairs (v → o, up → down) get a scale only, scored on the consumer's output. The group
   folds of step 2 leave the consumers' inputs as step 1 observed them (exact in full precision).

A search never makes its sampled loss worse than leaving the group alone: when no candidate beats
the identity, nothing is folded. Per-block results go to ``ctx.info["os_plus"]``: block, name,
``t`` (None when nothing was folded), channels scaled, shift, loss before and after, candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass as plain_dataclass
from dataclasses import field
from typing import Annotated, Any

import torch
from accelerate.utils import send_to_device
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn
from transformers import PretrainedConfig

from tersa.calib import BlockCache
from tersa.calib.stats import ChannelStats, observe_inputs
from tersa.config import STRICT, Bool, Int
from tersa.context import StageContext
from tersa.errors import ModelError, RecipeError
from tersa.models.adapters import group_norm, resolve
from tersa.models.layout import Adapter, NormGroup, ScalePair
from tersa.offload import onloaded
from tersa.quant.fold import expand_for_heads, fold_scale_pair, migrate_group
from tersa.quant.norms import has_bias
from tersa.quant.osplus_math import (
    SearchResult,
    channel_reach,
    channel_shift,
    reduce_repeated_heads,
    search_threshold,
    threshold_grid,
    threshold_scale,
)
from tersa.quant.osplus_score import (
    AttentionScore,
    GroupInputs,
    LinearScore,
    first_sequences,
)
from tersa.quant.replace import linear_weight, name_matches
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.registry import register_stage
from tersa.structured.guard import refuse_structured

INFO_KEY = "os_plus"


@dataclass(config=STRICT)
class OsPlusConfig:
    """OS+: per-channel shift and scale of linear inputs, searched for the quantization after it."""

    shift: Annotated[
        Bool | None,
        Field(
            description="shift channels to symmetric ranges (null: only where the norm already "
            "has a bias, e.g. OPT LayerNorm; true adds biases to Llama-family models)"
        ),
    ] = None
    pairs: Annotated[Bool, Field(description="also scale the v→o and up→down pairs")] = True
    # The paper scans max(100, max/0.5) linearly spaced thresholds. A log-spaced grid bounded by
    # the channel ranges (osplus_math.threshold_grid) spans the same range with far fewer points,
    # and a refinement pass around the coarse optimum recovers the resolution. On SmolLM2-135M
    # 20 + 4 candidates land within ~1% of the loss of 40 + 8 at half the time, which keeps the
    # stage (30 blocks, 2 CPU cores) near the 5-minute budget.
    grid: Annotated[Int, Field(ge=1, description="candidate thresholds per group, log-spaced")] = 20
    refine: Annotated[
        Int, Field(ge=0, description="extra thresholds between the best candidate's neighbours")
    ] = 4
    search_tokens: Annotated[
        Int,
        Field(ge=1, description="calibration tokens scored per candidate (whole sequences)"),
    ] = 2048
    weights: Annotated[
        WeightScheme | None,
        Field(description="weight scheme searched for (null: the following quantize stage's)"),
    ] = None
    activations: Annotated[
        ActivationScheme | None,
        Field(description="activation scheme searched for (null: the following quantize stage's)"),
    ] = None

    @property
    def needs_calibration(self) -> bool:
        """The search scores candidates on calibration activations."""
        return True


@plain_dataclass(frozen=True)
class _Target:
    """The quantization the search optimizes for, and the layers it leaves alone."""

    weights: WeightScheme | None
    activations: ActivationScheme | None
    ignore: tuple[str, ...] = ()

    def schemes(self, full_name: str) -> tuple[WeightScheme | None, ActivationScheme | None]:
        if name_matches(full_name, self.ignore):
            return None, None
        return self.weights, self.activations


def _target(cfg: OsPlusConfig, ctx: StageContext) -> _Target:
    after = ctx.next_config("quantize")
    if after is None and cfg.weights is None and cfg.activations is None:
        raise RecipeError(
            "os_plus searches its scales for the quantization that follows; add a quantize stage "
            "after it or set weights/activations in os_plus"
        )
    weights = cfg.weights if cfg.weights is not None else getattr(after, "weights", None)
    acts = cfg.activations if cfg.activations is not None else getattr(after, "activations", None)
    return _Target(weights, acts, tuple(getattr(after, "ignore", ())))


@register_stage("os_plus", OsPlusConfig, kind="transform")
def os_plus(model: nn.Module, cfg: OsPlusConfig, ctx: StageContext) -> nn.Module:
    """OS+: shift and scale outlier channels into the weights, searched for the next quantize."""
    refuse_structured(model, "os_plus")
    target = _target(cfg, ctx)
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    n_blocks = len(ctx.blocks(model))
    records: list[dict[str, Any]] = ctx.info.setdefault(INFO_KEY, [])
    pending: list[_BlockSearch] = []  # the block observed during the last propagation pass

    def finish(search: _BlockSearch) -> None:
        with onloaded(search.block, ctx.device):
            records.extend({"block": search.index, **record} for record in search.run())

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        # A pass over all calibration tokens costs as much as the whole search, so block i is
        # observed during the pass that propagates the cache through it, right after this call,
        # and searched and folded at the next call. The folds are exact in float: the outputs
        # already propagated stay valid.
        if pending:
            finish(pending.pop())
        groups = ctx.adapter.norm_groups_for(model.config)
        norms = {g: group_norm(model, ctx.adapter, g, i) for g in groups}
        path = f"{prefix}.{i}"
        search = _BlockSearch(block, i, cfg, target, ctx.adapter, model.config, path, norms)
        pending.append(search)
        search.watch(cache)
        if i + 1 == n_blocks:  # the last block's outputs are not propagated: a pass of its own
            cache.run(block)
            finish(pending.pop())

    try:
        with torch.no_grad():
            ctx.blockwise(model, process)
    finally:
        for search in pending:
            search.unwatch()
    return model


@plain_dataclass
class _BlockSearch:
    """One block: :meth:`watch` its activations during one pass, then :meth:`run` the searches
    and fold each group and pair."""

    block: nn.Module
    index: int
    cfg: OsPlusConfig
    target: _Target
    adapter: Adapter
    config: PretrainedConfig
    path: str  # the block's dotted name in the model, for ignore patterns and messages
    norms: dict[NormGroup, tuple[str, nn.Module]]  # each group's producing norm (group_norm)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sequences: list[tuple[torch.Tensor, dict[str, Any]]] = field(default_factory=list)
    _hooks: ExitStack = field(default_factory=ExitStack)
    _stats: dict[str, ChannelStats] = field(default_factory=dict)

    @property
    def _watched(self) -> list[str]:
        """Group inputs (each group's first linear) and pair consumers."""
        groups = [g.linears[0] for g in self.adapter.norm_groups_for(self.config)]
        pairs = [p.consumer for p in self.adapter.scale_pairs] if self.cfg.pairs else []
        return list(dict.fromkeys(groups + pairs))

    def watch(self, cache: BlockCache) -> None:
        """Keep the block's first whole sequences (for the attention search) and hook its inputs:
        the next pass of ``cache`` through the block records ranges and samples."""
        seq_len = cache.hidden[0].shape[1]
        n_seq = math.ceil(self.cfg.search_tokens / seq_len)  # attention mixes a sequence's tokens
        self.device, self.sequences = cache.device, first_sequences(cache, n_seq)
        modules = {f"{self.path}.{n}": self.block.get_submodule(n) for n in self._watched}
        self._stats = self._hooks.enter_context(observe_inputs(modules, n_seq * seq_len))

    def unwatch(self) -> None:
        self._hooks.close()

    def run(self) -> list[dict[str, Any]]:
        """Search and fold every group, then every pair; one record each."""
        self.unwatch()
        x = {
            n: GroupInputs.of(
                self._stats[f"{self.path}.{n}"], self.block.get_submodule(n), self.device
            )
            for n in self._watched
        }
        groups = self.adapter.norm_groups_for(self.config)
        pairs = self.adapter.scale_pairs if self.cfg.pairs else ()
        records = [self._group(g, x[g.linears[0]]) for g in groups]
        records += [self._pair(p, x[p.consumer]) for p in pairs]
        return [r for r in records if r is not None]

    # ---------------------------------------------------------------------------------- groups

    def _group(self, group: NormGroup, x: GroupInputs) -> dict[str, Any] | None:
        linears = {n: self.block.get_submodule(n) for n in group.linears}
        schemes = {n: self.target.schemes(f"{self.path}.{n}") for n in group.linears}
        if all(s == (None, None) for s in schemes.values()):
            return None  # the quantize stage leaves the whole group in float
        norm_path, norm = self.norms[group]
        name = norm_path if group.block_input else group.norm  # the block's own norms: relative
        use_shift = self.cfg.shift if self.cfg.shift is not None else has_bias(norm)
        z = channel_shift(x.min, x.max) if use_shift else None
        lo, hi = (x.min, x.max) if z is None else (x.min - z, x.max - z)
        a = self.adapter.attention
        if group.kind == "attention" and set(group.linears) <= {a.q, a.k, a.v}:
            sequences = [
                (h.to(self.device), send_to_device(kw, self.device)) for h, kw in self.sequences
            ]
            score = AttentionScore(self.block, linears, schemes, a.o, sequences, x)
        else:
            score = LinearScore(linears, schemes, x)
        best = self._search(lo, hi, lambda t: score(threshold_scale(lo, hi, t), z))
        if best is None:
            return None
        # t = max(reach) scales nothing: without a shift the grid's first loss is the identity's
        before = score(torch.ones_like(x.min), None) if z is not None else best.history[0][1]
        if best.loss >= before:  # a shift can cost more than it saves: then leave the group be
            return _record(name, None, None, None, before, before, len(best.history))
        s = threshold_scale(lo, hi, best.t)
        pre_norm = self.adapter.is_pre_norm(self.config)
        outside = norm if group.block_input else None
        migrate_group(self.block, group.norm, group.linears, s, z, pre_norm, norm=outside)
        return _record(name, best.t, s, z, before, best.loss, len(best.history))

    def _search(
        self, lo: torch.Tensor, hi: torch.Tensor, loss_at: Callable[[float], float]
    ) -> SearchResult | None:
        """The best threshold for the (shifted) channel range ``[lo, hi]``; None when the input
        is all zeros."""
        grid = threshold_grid(channel_reach(lo, hi), self.cfg.grid)
        if grid.numel() == 0:
            return None
        return search_threshold(loss_at, grid, self.cfg.refine)

    # ----------------------------------------------------------------------------------- pairs

    def _pair(self, pair: ScalePair, x: GroupInputs) -> dict[str, Any] | None:
        consumer = self.block.get_submodule(pair.consumer)
        producer = self.block.get_submodule(pair.producer)
        schemes = self.target.schemes(f"{self.path}.{pair.consumer}")
        if schemes == (None, None):
            return None
        a = self.adapter.attention
        head_dim = a.head_dim(self.config)
        n_rep = (
            a.num_heads(self.config) // a.num_kv_heads(self.config) if pair.producer == a.v else 1
        )
        lo, hi = reduce_repeated_heads(x.min, x.max, head_dim, n_rep)  # [producer out]
        if linear_weight(producer).shape[0] != lo.numel():
            raise ModelError(
                f"{self.path}: '{pair.producer}' has {linear_weight(producer).shape[0]} outputs "
                f"but '{pair.consumer}' reads {lo.numel()} channels; the architecture adapter "
                "does not match this model"
            )
        score = LinearScore({pair.consumer: consumer}, {pair.consumer: schemes}, x)

        def loss_at(t: float) -> float:
            return score(expand_for_heads(threshold_scale(lo, hi, t), head_dim, n_rep), None)

        best = self._search(lo, hi, loss_at)
        if best is None:
            return None
        name = f"{pair.producer}->{pair.consumer}"
        before = best.history[0][1]  # t = max(reach): s = 1, the identity
        if best.loss >= before:
            return _record(name, None, None, None, before, before, len(best.history))
        s = threshold_scale(lo, hi, best.t)
        fold_scale_pair(producer, consumer, s, head_dim=head_dim, n_rep=n_rep)
        return _record(name, best.t, s, None, before, best.loss, len(best.history))


def _record(
    name: str,
    t: float | None,
    s: torch.Tensor | None,
    z: torch.Tensor | None,
    before: float,
    after: float,
    candidates: int,
) -> dict[str, Any]:
    """One row of ``ctx.info["os_plus"]``; ``t`` is None when nothing was folded."""
    return {
        "name": name,
        "t": None if t is None else round(t, 6),
        "scaled": 0 if s is None else int((s > 1).sum()),
        "shift": z is not None,
        "loss_before": before,
        "loss_after": after,
        "candidates": candidates,
    }
