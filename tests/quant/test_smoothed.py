"""Post-norm migration: SmoothedLinear, QuantLinear's input transform, export and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tersa.context import StageContext
from tersa.errors import ModelError
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter, get_blocks, group_norm
from tersa.models.tiny import tiny_model
from tersa.quant.fold import migrate_group
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.smoothed import SmoothedLinear, effective_range
from tersa.quant.stage import QuantizeConfig, quantize

POST_NORM = [("bert", {}), ("opt", {"do_layer_norm_before": False})]
W8A8 = QuantizeConfig(weights=WeightScheme(bits=8), activations=ActivationScheme(bits=8))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _migrate_random(model: nn.Module, shift: bool, seed: int = 1) -> None:
    adapter = get_adapter(model)
    pre_norm = adapter.is_pre_norm(model.config)
    g = torch.Generator().manual_seed(seed)
    for i, block in enumerate(get_blocks(model, adapter)):
        for group in adapter.norm_groups_for(model.config):
            norm = group_norm(model, adapter, group, i)[1]
            c = norm.weight.shape[0]
            s = torch.rand(c, generator=g) * 4 + 0.25
            z = torch.randn(c, generator=g) if shift else None
            outside = norm if group.block_input else None
            migrate_group(block, group.norm, group.linears, s, z, pre_norm, norm=outside)


def _smoothed_per_block(family: str) -> int:
    """Linears a post-norm migration smooths per block: BERT's q/k/v (the block input) and
    intermediate.dense; OPT-350m's fc1 (its q/k/v read the previous block's norm, not listed)."""
    return 4 if family == "bert" else 1


def test_smoothed_linear_computes_linear_of_transformed_input() -> None:
    lin = nn.Linear(7, 5)
    sl = SmoothedLinear.from_linear(lin, shift=True)
    x = torch.randn(2, 3, 7)
    assert torch.equal(sl(x), lin(x))  # identity transform at creation
    assert sl.weight.data_ptr() == lin.weight.data_ptr()  # shares the storage
    s, z = torch.rand(7) + 0.5, torch.randn(7)
    sl.compose(s, z)
    torch.testing.assert_close(sl(x), F.linear((x - z) / s, lin.weight, lin.bias))
    s2, z2 = torch.rand(7) + 0.5, torch.randn(7)
    sl.compose(s2, z2)  # ((x − z)/s − z2)/s2
    torch.testing.assert_close(sl(x), F.linear(((x - z) / s - z2) / s2, lin.weight, lin.bias))
    lo, hi = effective_range(sl, x.amin((0, 1)), x.amax((0, 1)))
    ex = ((x - z) / s - z2) / s2
    torch.testing.assert_close((lo, hi), (ex.amin((0, 1)), ex.amax((0, 1))))


@pytest.mark.parametrize(("family", "overrides"), POST_NORM)
@pytest.mark.parametrize("shift", [False, True])
def test_post_norm_migration_keeps_logits(family: str, overrides: dict, shift: bool) -> None:
    model = tiny_model(family, **overrides)
    assert not get_adapter(model).is_pre_norm(model.config)
    ids = torch.randint(3, 300, (2, 17))
    ref = _logits(model, ids)
    _migrate_random(model, shift)
    _migrate_random(model, shift, seed=2)  # a second transform composes with the first
    assert _rel(_logits(model, ids), ref) < 1e-5
    smoothed = [m for m in model.modules() if isinstance(m, SmoothedLinear)]
    assert len(smoothed) == 2 * _smoothed_per_block(family)
    assert all((m.smooth_shift is not None) == shift for m in smoothed)
    assert all(not torch.equal(m.smooth_scale, torch.ones_like(m.smooth_scale)) for m in smoothed)


def test_block_input_group_keeps_the_producing_norm() -> None:
    model = tiny_model("bert")
    adapter = get_adapter(model)
    group = adapter.norm_groups[0]
    assert group.block_input and group.linears[0] == "attention.self.query"
    norms = {n: p.clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    _migrate_random(model, shift=True)
    assert all(torch.equal(p, norms[n]) for n, p in model.named_parameters() if n in norms)
    for block in get_blocks(model, adapter):
        for name in group.linears:
            assert isinstance(block.get_submodule(name), SmoothedLinear)
    block = get_blocks(model, adapter)[1]
    with pytest.raises(ModelError, match="read the block input"):
        migrate_group(
            block, group.norm, group.linears, None, None, True, norm=model.bert.embeddings.LayerNorm
        )


def test_post_norm_norm_is_untouched_and_input_transform_holds_scale() -> None:
    model = tiny_model("bert")
    block = get_blocks(model)[0]
    norm_weight = block.attention.output.LayerNorm.weight.clone()
    w = block.intermediate.dense.weight.clone()
    s = torch.rand(64) + 0.5
    migrate_group(block, "attention.output.LayerNorm", ["intermediate.dense"], s, None, False)
    dense = block.intermediate.dense
    assert isinstance(dense, SmoothedLinear) and dense.smooth_shift is None
    assert torch.equal(block.attention.output.LayerNorm.weight, norm_weight)
    torch.testing.assert_close(dense.smooth_scale, s)
    torch.testing.assert_close(dense.weight, w * s)


def test_post_norm_migration_refuses_quantized_consumers() -> None:
    model = tiny_model("bert")
    block = get_blocks(model)[0]
    ql = QuantLinear.from_float(block.intermediate.dense, WeightScheme(bits=8), None)
    block.intermediate.dense = ql
    with pytest.raises(ModelError) as e:
        migrate_group(
            block, "attention.output.LayerNorm", ["intermediate.dense"], None, None, False
        )
    assert str(e.value) == (
        "attention.output.LayerNorm: 'intermediate.dense' is a QuantLinear, not a float linear; "
        "outlier transforms must run before 'quantize'"
    )


def test_quant_linear_keeps_input_transform() -> None:
    lin = nn.Linear(33, 9)
    sl = SmoothedLinear.from_linear(lin, shift=True)
    sl.compose(torch.rand(33) + 0.5, torch.randn(33))
    x = torch.randn(4, 33)
    a8 = ActivationScheme(bits=8, granularity="tensor")
    q = QuantLinear.from_float(sl, WeightScheme(bits=8), a8)
    assert q.scheme_dict()["smooth"] == "scale_shift"
    assert torch.equal(q.smooth_scale, sl.smooth_scale)
    q.set_input_range(-3.0, 3.0)
    plain = QuantLinear.from_float(nn.Linear(33, 9), WeightScheme(bits=8), a8)
    plain.load_state_dict(
        {k: v for k, v in q.state_dict().items() if not k.startswith("smooth")}, strict=True
    )
    plain.set_input_range(-3.0, 3.0)
    ex = (x - sl.smooth_shift) / sl.smooth_scale
    assert torch.equal(q(x), plain(ex))  # the transform runs before the quantizer
    assert "smooth" not in plain.scheme_dict()
    meta = QuantLinear.from_scheme_dict(q.scheme_dict(), 33, 9, True, device="meta")
    meta.load_state_dict(q.state_dict(), assign=True)
    assert torch.equal(meta(x), q(x))


@pytest.mark.parametrize(("family", "overrides"), POST_NORM)
@pytest.mark.parametrize(
    "ignore", [[], ["*.0.intermediate.dense", "*.0.attention.self.*", "*.0.fc1"]]
)
def test_quantized_post_norm_export_reloads(
    tmp_path: Path, family: str, overrides: dict, ignore: list[str]
) -> None:
    model = tiny_model(family, **overrides)
    _migrate_random(model, shift=True)
    cfg = QuantizeConfig(weights=W8A8.weights, activations=W8A8.activations, ignore=ignore)
    model = quantize(model, cfg, StageContext(get_adapter(model), torch.device("cpu")))
    smoothed = [n for n, m in model.named_modules() if type(m) is SmoothedLinear]
    per_block = _smoothed_per_block(family)
    assert len(smoothed) == (per_block if ignore else 0)
    if family == "bert" and ignore:  # block 0's q/k/v stay float, smoothed on the block input
        qkv = [f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
        assert set(qkv) <= set(smoothed)
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersa"
    extensions = qc["tersa"]
    assert extensions.get("smoothed", []) == smoothed
    assert extensions.get("smoothed_shifts", []) == smoothed
    assert len(extensions["smooth"]) == 2 * per_block - len(smoothed)
    ids = torch.randint(3, 300, (2, 11))
    loaded = load_export(tmp_path)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
