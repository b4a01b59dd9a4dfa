"""``RatPlusConfig``: a Llama-like decoder whose attention runs over gated recurrent keys and values."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from tersa.kv.masks import KVPattern, layer_patterns

ATTENTION_KINDS = ("ratplus", "attention")


class RatPlusConfig(PretrainedConfig):
    r"""Configuration of :class:`~tersa.kv.modeling_ratplus.RatPlusForCausalLM` (``model_type: ratplus``).

    The Llama fields mean what they mean in ``LlamaConfig`` (RoPE is the default kind, base
    ``rope_theta``). The RAT+ fields:

    - ``attention``: ``"ratplus"`` (gated recurrence on keys and values before attention) or
      ``"attention"`` (the twin: the same block without the forget gate; it keeps the output gate).
    - ``forget_gate_bias_init``: initial bias of the forget gate ``g = σ(W_g x + b_g)``. The default
      3.0 starts ``g ≈ 0.95`` (a memory of ~20 tokens); with 0 the gate stayed near 0.5 in training
      and the dilated patterns lost as much as plain attention.
    - ``output_gate_bias_init``: initial bias of the output gate ``σ(W_z x + b_z)``.
    - ``scan_chunk``: chunk length of the parallel scan.
    - ``kv_pattern``: the inference pattern, one for every layer or a list with one per layer;
      each a dict with ``dilation``, ``window``, ``sinks`` (:class:`~tersa.kv.masks.KVPattern`),
      ``"dense"`` or None (dense). Set at load with ``from_pretrained(path, kv_pattern=...)``.
    """

    model_type = "ratplus"

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention: str = "ratplus"
    forget_gate_bias_init: float = 3.0
    output_gate_bias_init: float = 0.0
    scan_chunk: int = 16
    kv_pattern: Any = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.scan_chunk < 1:
            raise ValueError(f"scan_chunk must be >= 1, got {self.scan_chunk}")
        self.kv_pattern = pattern_json(self.kv_pattern, self.num_hidden_layers)
        super().__post_init__(**kwargs)

    @property
    def recurrent(self) -> bool:
        """True when the blocks run the gated recurrence (``attention == "ratplus"``)."""
        return self.attention == "ratplus"


def pattern_json(value: Any, num_layers: int) -> Any:
    """``value`` validated and in its JSON form: None (dense everywhere), one dict, or a list of dicts."""
    patterns = layer_patterns(value, num_layers)
    if value is None or value == "dense":
        return None
    if isinstance(value, list | tuple):
        return [p.to_dict() for p in patterns]
    return KVPattern.from_value(value).to_dict()
