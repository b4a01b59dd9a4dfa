"""The per-family adapter definitions, checked against transformers 5.24 module names.

Every path here was read off ``named_modules()`` of a model built from ``tiny_config(family)``;
``tests/models/test_adapters.py`` re-checks all of them on every run.
"""

from __future__ import annotations

from tersa.models.layout import Adapter, AttentionLayout, ConfigLinear, NormGroup, ScalePair


def _llama_like(
    model_type: str,
    qk_norm: bool = False,
    rotary: bool = True,
    gates: tuple[str, ...] = (),
    conditional: tuple[ConfigLinear, ...] = (),
) -> Adapter:
    """Llama, Mistral, Qwen2 and Qwen3 share one layout (Qwen3 adds per-head q/k RMSNorm); RAT+
    has no rotary module and more linears (``gates``) reading the attention norm."""
    return Adapter(
        model_type=model_type,
        causal=True,
        base="model",
        blocks="model.layers",
        # RoPE tables are a module on the bare model, computed once before the first block.
        embeddings=("model.embed_tokens", "model.rotary_emb")
        if rotary
        else ("model.embed_tokens",),
        final_norm="model.norm",
        lm_head="lm_head",
        norm_groups=(
            NormGroup(
                "input_layernorm",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", *gates),
                "attention",
            ),
            NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ),
        # up → down is exact because the gate multiplies elementwise: (g ⊙ u/s)·(W s) = (g ⊙ u)·W.
        scale_pairs=(
            ScalePair("self_attn.v_proj", "self_attn.o_proj"),
            ScalePair("mlp.up_proj", "mlp.down_proj"),
        ),
        attention=AttentionLayout(
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            num_kv_heads_attr="num_key_value_heads",
            head_dim_attr="head_dim",
            q_norm="self_attn.q_norm" if qk_norm else None,
            k_norm="self_attn.k_norm" if qk_norm else None,
        ),
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        conditional=conditional,
    )


OPT = Adapter(
    model_type="opt",
    causal=True,
    base="model",
    blocks="model.decoder.layers",
    # project_in/project_out exist only when word_embed_proj_dim != hidden_size (OPT-350m).
    embeddings=(
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.project_in",
    ),
    # Absent in post-norm configs (do_layer_norm_before=False).
    final_norm="model.decoder.final_layer_norm",
    lm_head="lm_head",
    after_blocks=("model.decoder.project_out",),
    norm_groups=(
        NormGroup(
            "self_attn_layer_norm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "attention",
        ),
        NormGroup("final_layer_norm", ("fc1",), "mlp"),
    ),
    # Post-norm: self_attn_layer_norm (after the attention residual) feeds fc1; final_layer_norm
    # feeds the next block's q/k/v. That would be a block-input group (as BERT's), but block 0
    # reads the embeddings (plus project_in) with no norm before them, so it is not listed.
    post_norm_groups=(NormGroup("self_attn_layer_norm", ("fc1",), "mlp"),),
    pre_norm_attr="do_layer_norm_before",
    # fc1 → fc2 is left out: ReLU commutes with positive scales only, and not with shifts.
    scale_pairs=(ScalePair("self_attn.v_proj", "self_attn.out_proj"),),
    attention=AttentionLayout(
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj"
    ),
    mlp=("fc1", "fc2"),
)

GPT2 = Adapter(
    model_type="gpt2",
    causal=True,
    base="transformer",
    blocks="transformer.h",
    embeddings=("transformer.wte", "transformer.wpe"),
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    norm_groups=(
        NormGroup("ln_1", ("attn.c_attn",), "attention"),
        NormGroup("ln_2", ("mlp.c_fc",), "mlp"),
    ),
    # c_attn is a fused [q | k | v] Conv1D: only its v third migrates exactly into c_proj, and a
    # whole-module pair would wrongly scale q and k. c_fc → c_proj has GELU between. So: none.
    scale_pairs=(),
    attention=AttentionLayout(
        q="attn.c_attn", k="attn.c_attn", v="attn.c_attn", o="attn.c_proj", fused_qkv=True
    ),
    mlp=("mlp.c_fc", "mlp.c_proj"),
)

BERT = Adapter(
    model_type="bert",
    causal=False,
    base="bert",
    blocks="bert.encoder.layer",
    embeddings=("bert.embeddings",),  # word + position + token-type embeddings, then LayerNorm
    final_norm=None,  # post-norm: every block already ends in output.LayerNorm
    lm_head="cls",  # BertOnlyMLMHead (dense, GELU, LayerNorm, decoder); absent on BertModel
    pre_norm=False,
    # query/key/value read the block input: the previous block's output.LayerNorm, or the
    # embeddings' LayerNorm for block 0. A block-input group names both; being post-norm, its
    # transform stays on q/k/v's inputs (SmoothedLinear) and the residual stream keeps the norm's.
    norm_groups=(
        NormGroup(
            "output.LayerNorm",
            ("attention.self.query", "attention.self.key", "attention.self.value"),
            "attention",
            block_input=True,
            first_norm="bert.embeddings.LayerNorm",
        ),
        NormGroup("attention.output.LayerNorm", ("intermediate.dense",), "mlp"),
    ),
    scale_pairs=(ScalePair("attention.self.value", "attention.output.dense"),),
    attention=AttentionLayout(
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        o="attention.output.dense",
    ),
    mlp=("intermediate.dense", "output.dense"),
)

# tersa's RAT+ (tersa/kv/modeling_ratplus.py): Llama's layout, with RoPE computed inside the
# attention (no rotary module) and two more consumers of the attention norm, the output gate and
# (in recurrent blocks only; not in the plain-attention twin) the forget gate. v → o stays exact:
# the recurrence, the attention and the output gate all act per channel on v.
RATPLUS = _llama_like(
    "ratplus",
    rotary=False,
    gates=("self_attn.out_gate_proj", "self_attn.forget_gate_proj"),
    conditional=(ConfigLinear("self_attn.forget_gate_proj", "attention", "ratplus"),),
)

# The registry: HF model_type → Adapter. Adding a family means adding one line here.
ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3", qk_norm=True),
    "opt": OPT,
    "gpt2": GPT2,
    "bert": BERT,
    "ratplus": RATPLUS,
}
