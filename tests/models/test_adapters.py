"""Every adapter path must name a real module of transformers' own model classes.

The exactness tests apply the transformation each ``scale_pairs`` / ``norm_groups`` entry promises
and check the logits do not move, so a wrong pair fails here rather than in a quantization pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import BertModel, LlamaModel, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tersa.errors import ModelError
from tersa.models.adapters import (
    Adapter,
    NormGroup,
    get_adapter,
    get_blocks,
    get_submodule,
    group_norm,
    linear_weight,
    resolve,
    supported_model_types,
)
from tersa.models.tiny import tiny_config, tiny_families, tiny_model

FAMILIES = tiny_families()
HIDDEN = 64


def _is_norm(module: nn.Module) -> bool:
    # HF RMSNorms (LlamaRMSNorm, Qwen3RMSNorm, ...) are plain nn.Modules, not nn.RMSNorm.
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(
        "RMSNorm"
    )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Conv1D)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, PreTrainedModel, Adapter]:
    model = tiny_model(request.param)
    return request.param, model, get_adapter(model)


def test_supported_model_types_sorted() -> None:
    assert supported_model_types() == [
        "bert",
        "gpt2",
        "llama",
        "mistral",
        "opt",
        "qwen2",
        "qwen3",
        "ratplus",
    ]
    assert sorted(FAMILIES) == supported_model_types()


def test_unsupported_model_type_message() -> None:
    expected = (
        "unsupported model_type 'xyz'; "
        "tersa supports: bert, gpt2, llama, mistral, opt, qwen2, qwen3, ratplus"
    )
    with pytest.raises(ModelError) as err:
        get_adapter("xyz")
    assert str(err.value) == expected


def test_get_adapter_accepts_model_config_and_name() -> None:
    model = tiny_model("llama")
    assert get_adapter(model) is get_adapter(model.config) is get_adapter("llama")


def test_get_adapter_without_config() -> None:
    with pytest.raises(ModelError, match="cannot tell the architecture of a Linear"):
        get_adapter(nn.Linear(2, 2))


def test_blocks(family_model: tuple[str, PreTrainedModel, Adapter]) -> None:
    _, model, adapter = family_model
    blocks = get_blocks(model, adapter)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers == 2
    assert get_submodule(model, adapter.blocks) is blocks


def test_adapter_names_every_block_linear(family_model) -> None:
    _, model, adapter = family_model
    block = get_blocks(model, adapter)[0]
    found = {name for name, m in block.named_modules() if _is_linear(m)}
    assert found == set(adapter.linears())


def test_attention_shapes(family_model) -> None:
    family, model, adapter = family_model
    config, att = model.config, adapter.attention
    heads, kv, hd = att.num_heads(config), att.num_kv_heads(config), att.head_dim(config)
    assert (heads, hd) == (4, 16)
    assert kv == (2 if family in {"llama", "mistral", "qwen2", "qwen3", "ratplus"} else 4)
    block = get_blocks(model, adapter)[0]
    shape = {n: tuple(linear_weight(get_submodule(block, n)).shape) for n in adapter.linears()}
    if att.fused_qkv:
        assert shape[att.q] == (3 * heads * hd, HIDDEN)
    else:
        assert shape[att.q] == (heads * hd, HIDDEN)
        assert shape[att.k] == shape[att.v] == (kv * hd, HIDDEN)
    assert shape[att.o] == (HIDDEN, heads * hd)


def test_mlp_shapes(family_model) -> None:
    family, model, adapter = family_model
    inter = 176 if family == "llama" else 128
    block = get_blocks(model, adapter)[0]
    *up, down = adapter.mlp
    for name in up:
        assert tuple(linear_weight(get_submodule(block, name)).shape) == (inter, HIDDEN)
    assert tuple(linear_weight(get_submodule(block, down)).shape) == (HIDDEN, inter)


def test_norm_groups(family_model) -> None:
    family, model, adapter = family_model
    groups = adapter.norm_groups_for(model.config)
    assert {g.kind for g in groups} == {"attention", "mlp"}
    # Only BERT's q/k/v read the block input (the previous block's output.LayerNorm).
    assert [g.kind for g in groups if g.block_input] == (["attention"] if family == "bert" else [])
    for i, block in enumerate(get_blocks(model, adapter)):
        for group in groups:
            path, norm = group_norm(model, adapter, group, i)
            assert _is_norm(norm) and model.get_submodule(path) is norm
            assert tuple(norm.weight.shape) == (HIDDEN,)
            if not group.block_input:
                assert norm is get_submodule(block, group.norm)
            for name in group.linears:
                linear = get_submodule(block, name)
                assert _is_linear(linear)
                assert linear_weight(linear).shape[1] == HIDDEN


@pytest.mark.parametrize(
    ("family", "overrides"),
    [(f, {}) for f in FAMILIES]
    + [("opt", {"do_layer_norm_before": False}), ("ratplus", {"attention": "attention"})],
)
def test_norm_groups_read_their_norm_output(family: str, overrides: dict) -> None:
    """What every group linear multiplies is exactly its producing norm's output, in every block
    (block 0 of a block-input group included: the embeddings' norm)."""
    model = tiny_model(family, **overrides)
    adapter = get_adapter(model)
    prefix = resolve(model, adapter, adapter.blocks)
    wiring = [  # (producing norm, consumer linear), full paths
        (group_norm(model, adapter, g, i)[0], f"{prefix}.{i}.{name}")
        for i in range(len(get_blocks(model, adapter)))
        for g in adapter.norm_groups_for(model.config)
        for name in g.linears
    ]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, output: bool):  # a hook keeping a norm output or a linear input
        def hook(_m: nn.Module, args: tuple, *out: torch.Tensor) -> None:
            seen[name] = out[0] if output else args[0]

        return hook

    norms = {n for n, _ in wiring}
    handles = [model.get_submodule(n).register_forward_hook(keep(n, True)) for n in norms]
    handles += [model.get_submodule(c).register_forward_pre_hook(keep(c, False)) for _, c in wiring]
    _logits(model)
    for h in handles:
        h.remove()
    for norm, consumer in wiring:  # OPT flattens fc1's input to [tokens, hidden]
        x, y = (seen[n].reshape(-1, HIDDEN) for n in (consumer, norm))
        assert torch.equal(x, y), (norm, consumer)


def test_group_norm_errors_and_block_input_checks() -> None:
    model = tiny_model("bert")
    adapter = get_adapter(model)
    qkv = adapter.norm_groups[0]
    with pytest.raises(ModelError, match="block 2 out of range: the model has 2 blocks"):
        group_norm(model, adapter, qkv, 2)
    with pytest.raises(ValueError, match="needs first_norm"):
        NormGroup("output.LayerNorm", ("attention.self.query",), "attention", block_input=True)
    with pytest.raises(ValueError, match="only valid in a post-norm layout"):
        replace(get_adapter("bert"), pre_norm=True)
    with pytest.raises(ValueError, match="only valid in a post-norm layout"):
        replace(get_adapter("opt"), norm_groups=(qkv,))  # OPT can be pre-norm
    replace(get_adapter("opt"), post_norm_groups=(qkv,))  # post-norm only: accepted


def test_qk_norm_only_on_qwen3(family_model) -> None:
    family, model, adapter = family_model
    att = adapter.attention
    if family != "qwen3":
        assert att.q_norm is att.k_norm is None
        return
    block = get_blocks(model, adapter)[0]
    for name in (att.q_norm, att.k_norm):
        norm = get_submodule(block, name)
        assert _is_norm(norm) and tuple(norm.weight.shape) == (att.head_dim(model.config),)


def test_top_level_modules(family_model) -> None:
    family, model, adapter = family_model
    for path in adapter.embeddings:
        if path.endswith("project_in"):
            assert resolve(model, adapter, path) is None  # word_embed_proj_dim == hidden
        else:
            assert resolve(model, adapter, path) == path
    assert [resolve(model, adapter, p) for p in adapter.after_blocks] == [None] * len(
        adapter.after_blocks
    )
    if adapter.final_norm is None:
        assert family == "bert"
    else:
        assert _is_norm(get_submodule(model, adapter.final_norm))
    head = get_submodule(model, adapter.lm_head)
    assert head(torch.zeros(1, HIDDEN)).shape == (1, 320)


def test_pre_norm_flags() -> None:
    assert all(get_adapter(f).is_pre_norm(tiny_config(f)) for f in FAMILIES if f != "bert")
    assert not get_adapter("bert").is_pre_norm(tiny_config("bert"))


def test_opt_post_norm_wiring() -> None:
    """OPT-350m style: norms after the residual, a projection around the blocks."""
    model = tiny_model("opt", do_layer_norm_before=False, word_embed_proj_dim=32)
    adapter = get_adapter(model)
    assert not adapter.is_pre_norm(model.config)
    assert adapter.norm_groups_for(model.config) == adapter.post_norm_groups
    assert resolve(model, adapter, adapter.final_norm) is None
    assert resolve(model, adapter, "model.decoder.project_in") == "model.decoder.project_in"
    assert resolve(model, adapter, adapter.after_blocks[0]) == "model.decoder.project_out"
    block = get_blocks(model, adapter)[0]
    (group,) = adapter.post_norm_groups
    assert _is_norm(get_submodule(block, group.norm))


@pytest.mark.parametrize(
    ("bare", "blocks", "head"),
    [(BertModel, "encoder.layer", None), (LlamaModel, "layers", None)],
)
def test_bare_models_resolve_without_base(bare: type, blocks: str, head: None) -> None:
    family = "bert" if bare is BertModel else "llama"
    model = bare(tiny_config(family))
    adapter = get_adapter(model)
    assert resolve(model, adapter, adapter.blocks) == blocks
    assert get_blocks(model, adapter) is model.get_submodule(blocks)
    assert resolve(model, adapter, adapter.lm_head) is head
    first = {group_norm(model, adapter, g, 0)[0] for g in adapter.norm_groups if g.block_input}
    assert first == ({"embeddings.LayerNorm"} if family == "bert" else set())


def test_get_blocks_wrong_model() -> None:
    with pytest.raises(ModelError, match=r"cannot find the llama blocks on a Linear: looked for"):
        get_blocks(nn.Linear(2, 2), get_adapter("llama"))


def test_linear_weight_conv1d_is_a_view() -> None:
    conv = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs; weight stored [4, 6]
    w = linear_weight(conv)
    assert w.shape == (6, 4)
    with torch.no_grad():
        w[0, 0] = 7.0
    assert conv.weight[0, 0] == 7.0
    with pytest.raises(TypeError, match=r"expected nn\.Linear or transformers Conv1D, got ReLU"):
        linear_weight(nn.ReLU())


def _logits(model: PreTrainedModel) -> torch.Tensor:
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _scale_rows(module: nn.Module, s: torch.Tensor) -> None:
    """Divide output channel c by s[c] (weight row and bias)."""
    linear_weight(module).div_(s[:, None])
    if module.bias is not None:
        module.bias.div_(s)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_pairs_are_exact(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    att = adapter.attention
    ref = _logits(model)
    with torch.no_grad():
        for block in get_blocks(model, adapter):
            for producer, consumer in adapter.scale_pairs:
                p, c = get_submodule(block, producer), get_submodule(block, consumer)
                s = torch.rand(linear_weight(p).shape[0]) + 0.5
                if producer == att.v:  # GQA: kv head g feeds query heads g*rep .. g*rep+rep-1
                    rep = att.num_heads(model.config) // att.num_kv_heads(model.config)
                    s_in = s.view(-1, att.head_dim(model.config)).repeat_interleave(rep, 0)
                    s_in = s_in.flatten()
                else:
                    s_in = s
                _scale_rows(p, s)
                linear_weight(c).mul_(s_in[None, :])
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)
    assert adapter.scale_pairs or family == "gpt2"


@pytest.mark.parametrize(
    ("family", "overrides"),
    [(f, {}) for f in FAMILIES if f != "bert"] + [("ratplus", {"attention": "attention"})],
)
def test_norm_folding_is_exact_when_pre_norm(family: str, overrides: dict) -> None:
    model = tiny_model(family, **overrides)
    adapter = get_adapter(model)
    ref = _logits(model)
    with torch.no_grad():
        for block in get_blocks(model, adapter):
            for group in adapter.norm_groups_for(model.config):
                norm = get_submodule(block, group.norm)
                s = torch.rand(HIDDEN) + 0.5
                norm.weight.div_(s)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s)
                for name in group.linears:
                    linear_weight(get_submodule(block, name)).mul_(s[None, :])
    torch.testing.assert_close(_logits(model), ref, rtol=1e-4, atol=1e-4)


def test_ratplus_gates_join_the_attention_group_when_present() -> None:
    """RAT+'s output gate reads the attention norm in both kinds; its forget gate exists (and is
    in the group) only in recurrent blocks, not in the plain-attention twin."""
    adapter = get_adapter("ratplus")
    recurrent = adapter.norm_groups_for(tiny_config("ratplus"))[0].linears
    twin = adapter.norm_groups_for(tiny_config("ratplus", attention="attention"))[0].linears
    assert recurrent[3:] == ("self_attn.out_gate_proj", "self_attn.forget_gate_proj")
    assert twin == recurrent[:4]
    assert (
        tiny_model("ratplus", attention="attention").model.layers[0].self_attn.forget_gate_proj
        is None
    )
