"""What an architecture adapter says about a model: the dataclasses, no per-family data.

All paths are dotted module names as ``named_modules()`` prints them. Top-level paths
(``blocks``, ``embeddings``, ``final_norm``, ``lm_head``) are written for the task model
(``LlamaForCausalLM``, ``BertForMaskedLM``) and also resolve on the bare model (``LlamaModel``,
``BertModel``) by dropping ``Adapter.base``. Paths inside ``norm_groups``, ``scale_pairs``,
``attention`` and ``mlp`` are relative to one block, except a block-input group's norm (relative to
the previous block) and ``first_norm`` (top-level): see :class:`NormGroup`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from transformers import PretrainedConfig

NormKind = Literal["attention", "mlp"]


@dataclass(frozen=True)
class NormGroup:
    """A norm and the linears that read its output.

    In a pre-norm block the norm output feeds only these linears, so a per-channel scale folds
    exactly from the norm weight (and bias) into their input columns. In a post-norm block the norm
    output also feeds the residual stream and folding changes the model: check
    ``Adapter.is_pre_norm(config)`` first.

    A **block-input group** (``block_input=True``) names linears that read the block's own input,
    the residual stream, rather than a norm inside the block: BERT's query/key/value, whose input
    is the previous block's last norm (``output.LayerNorm``) or, for the first block, the
    embeddings' norm. ``norm`` is then relative to the *previous* block and ``first_norm`` is the
    top-level path (like ``Adapter.embeddings``) of the norm whose output block 0 reads;
    :func:`tersa.models.adapters.group_norm` resolves the right one for a block index. Keeping the
    linears in the block they belong to, rather than attaching them to the block that owns the norm,
    lets every stage treat the group block by block like any other: its statistics are the block's
    own inputs and its transform lands on the block's own linears. Only the consumer-side
    (post-norm, :class:`~tersa.quant.smoothed.SmoothedLinear`) migration applies: the norm output is
    the residual stream, so nothing may fold into the norm (``Adapter`` refuses the group on a
    pre-norm layout).
    """

    norm: str
    linears: tuple[str, ...]
    kind: NormKind
    block_input: bool = False
    first_norm: str | None = None

    def __post_init__(self) -> None:
        if self.block_input != (self.first_norm is not None):
            raise ValueError(
                f"NormGroup {self.norm!r}: a block-input group needs first_norm (the norm before "
                "the first block), and only a block-input group takes one"
            )


class ScalePair(NamedTuple):
    """Linears where ``producer``'s output channels are ``consumer``'s input channels.

    Dividing producer output channel ``c`` (weight row and bias) by ``s[c]`` and multiplying
    consumer input column ``c`` by ``s[c]`` leaves the block output unchanged. For ``v → o`` under
    GQA the consumer has ``num_heads / num_kv_heads`` times more input columns: kv channel ``c`` of
    kv head ``g`` maps to the same channel of every query head in group ``g``, i.e.
    ``s_o = s_v.view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, 0).flatten()``.
    """

    producer: str
    consumer: str


class ConfigLinear(NamedTuple):
    """A block linear that exists only when ``config.<attr> == value`` (RAT+'s forget gate exists
    only in its recurrent blocks, not in its plain-attention twin)."""

    linear: str
    attr: str
    value: object


@dataclass(frozen=True)
class AttentionLayout:
    """Where the attention projections live inside a block and how to read head counts.

    With ``fused_qkv`` (GPT-2) ``q``, ``k`` and ``v`` name the same ``Conv1D`` whose output is
    ``[q | k | v]``, each ``hidden`` wide. ``q_norm``/``k_norm`` are per-head norms applied to the q
    and k projections before RoPE (Qwen3); a per-channel scale on q/k outputs does not commute with
    them.
    """

    q: str
    k: str
    v: str
    o: str
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str | None = None  # None: no GQA, kv heads == heads
    head_dim_attr: str | None = None  # None or unset in the config: hidden_size // num_heads
    fused_qkv: bool = False
    q_norm: str | None = None
    k_norm: str | None = None

    def num_heads(self, config: PretrainedConfig) -> int:
        """Number of query heads."""
        return int(getattr(config, self.num_heads_attr))

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        """Number of key/value heads (equal to ``num_heads`` without GQA)."""
        if self.num_kv_heads_attr is None:
            return self.num_heads(config)
        value = getattr(config, self.num_kv_heads_attr, None)
        return self.num_heads(config) if value is None else int(value)

    def head_dim(self, config: PretrainedConfig) -> int:
        """Channels per head."""
        value = getattr(config, self.head_dim_attr, None) if self.head_dim_attr else None
        return int(value) if value is not None else config.hidden_size // self.num_heads(config)


@dataclass(frozen=True)
class Adapter:
    """How tersa finds its way around one HF architecture (one ``model_type``).

    :param model_type: the HF ``config.model_type``.
    :param causal: a decoder LM (``AutoModelForCausalLM``); False for an encoder
        (``AutoModelForMaskedLM``).
    :param base: the bare model's attribute on the task model (``model``, ``transformer``,
        ``bert``).
    :param blocks: the ``nn.ModuleList`` of blocks.
    :param embeddings: modules that run before the first block (token/position embeddings, RoPE).
    :param final_norm: the norm after the last block, or None.
    :param lm_head: the output head, or None (then the bare model has none either).
    :param after_blocks: other modules between the last block and the head (OPT ``project_out``).
    :param norm_groups: norm → consumer linears, for the default norm placement of this family
        (block-input groups only if that placement is post-norm and fixed).
    :param post_norm_groups: the wiring when ``pre_norm_attr`` makes the config post-norm
        (OPT-350m).
    :param scale_pairs: producer → consumer pairs where a per-channel scale migrates exactly.
    :param attention: the attention projections.
    :param mlp: the MLP linears in execution order.
    :param pre_norm: the family default placement of norms.
    :param pre_norm_attr: a config flag that overrides ``pre_norm`` (OPT ``do_layer_norm_before``).
    :param conditional: linears of ``norm_groups`` that only some configs have; the groups of a
        config without them leave them out.

    Optional top-level paths (``project_in``, ``final_norm``) may be absent from a given config;
    resolve them with ``tersa.models.adapters.resolve``, which returns None for a missing module.
    """

    model_type: str
    causal: bool
    base: str
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str | None
    norm_groups: tuple[NormGroup, ...]
    scale_pairs: tuple[ScalePair, ...]
    attention: AttentionLayout
    mlp: tuple[str, ...]
    after_blocks: tuple[str, ...] = ()
    post_norm_groups: tuple[NormGroup, ...] = ()
    pre_norm: bool = True
    pre_norm_attr: str | None = None
    conditional: tuple[ConfigLinear, ...] = ()

    def __post_init__(self) -> None:
        # norm_groups serve pre-norm configs unless the family is post-norm with no config flag;
        # post_norm_groups only ever serve post-norm ones.
        always_post_norm = self.pre_norm_attr is None and not self.pre_norm
        bad = [] if always_post_norm else [g for g in self.norm_groups if g.block_input]
        if bad:
            raise ValueError(
                f"{self.model_type}: block-input group {bad[0].linears} would run pre-norm; it "
                "reads the residual stream and is only valid in a post-norm layout "
                "(post_norm_groups, or norm_groups with pre_norm=False)"
            )

    def is_pre_norm(self, config: PretrainedConfig) -> bool:
        """True when every norm output feeds only linears (norm folding is exact)."""
        if self.pre_norm_attr is None:
            return self.pre_norm
        return bool(getattr(config, self.pre_norm_attr, self.pre_norm))

    def norm_groups_for(self, config: PretrainedConfig) -> tuple[NormGroup, ...]:
        """The norm → linears wiring for this config (differs for post-norm OPT)."""
        groups = self.norm_groups
        if self.pre_norm_attr is not None and not self.is_pre_norm(config):
            groups = self.post_norm_groups
        absent = {c.linear for c in self.conditional if getattr(config, c.attr, None) != c.value}
        if not absent:
            return groups
        return tuple(
            replace(g, linears=tuple(n for n in g.linears if n not in absent)) for g in groups
        )

    def linears(self) -> tuple[str, ...]:
        """Every linear of a block (attention, other norm consumers such as RAT+'s gates, then
        MLP), each once; ``conditional`` ones included."""
        a = self.attention
        groups = (*self.norm_groups, *self.post_norm_groups)
        names = (a.q, a.k, a.v, a.o, *(n for g in groups for n in g.linears), *self.mlp)
        return tuple(dict.fromkeys(names))
