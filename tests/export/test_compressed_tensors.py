"""Exports compressed-tensors can describe load with plain transformers + compressed-tensors.

The tiny Llama here has hidden 128, 8 heads of 16 and intermediate 256, so every linear's
in_features is a multiple of 128 and all group sizes are expressible. Tolerances on the logits
(relative L2 error ``‖a − b‖ / ‖a‖``, logits of magnitude ~1):

- weight-only and static schemes: ≤ 1e-5, float rounding only (compressed-tensors dequantizes the
  same codes, scales and zero points; tersa may run a fused kernel);
- dynamic per-token symmetric inputs: ≤ 3e-2, because compressed-tensors' reference quantizer uses
  the step ``max|x| / 127.5`` where tersa (and int8 kernels) use ``max|x| / 127`` (measured ~1e-2).
  The weights themselves must then match exactly, and with tersa's step patched into
  compressed-tensors the logits agree to 1e-5 (test_per_token_gap_is_only_the_step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization.lifecycle import forward as ct_forward
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from tersa.context import StageContext
from tersa.export.load import is_tersa_export, load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.primitives import compute_qparams, pack_int32
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.stage import QuantizeConfig, quantize

TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 8}
EXACT, PER_TOKEN = 1e-5, 3e-2


def _group(bits: int, size: int, symmetric: bool) -> WeightScheme:
    return WeightScheme(bits=bits, granularity="group", group_size=size, symmetric=symmetric)


# name: (weights, activations, compressed-tensors format, logits tolerance)
CASES = {
    **{
        f"w4a16-g{g}-{'sym' if s else 'asym'}": (_group(4, g, s), None, "pack-quantized", EXACT)
        for g in (32, 64, 128)
        for s in (True, False)
    },
    "w8a16-channel": (WeightScheme(), None, "pack-quantized", EXACT),
    "w8a16-channel-asym": (WeightScheme(symmetric=False), None, "pack-quantized", EXACT),
    "w3a16-tensor-asym": (
        WeightScheme(bits=3, granularity="tensor", symmetric=False),
        None,
        "pack-quantized",
        EXACT,
    ),
    "w8a8-token": (WeightScheme(), ActivationScheme(), "int-quantized", PER_TOKEN),
    "w4a8-g128-token": (_group(4, 128, True), ActivationScheme(), "pack-quantized", PER_TOKEN),
    "w8a8-asym-token": (  # asymmetric per-token steps agree exactly
        WeightScheme(),
        ActivationScheme(symmetric=False),
        "int-quantized",
        EXACT,
    ),
    "a6-token-asym": (None, ActivationScheme(bits=6, symmetric=False), "dense", EXACT),
    "w8a8-static": (WeightScheme(), ActivationScheme(granularity="tensor"), "int-quantized", EXACT),
    "w4a8-g64-static-asym": (
        _group(4, 64, True),
        ActivationScheme(granularity="tensor", symmetric=False),
        "pack-quantized",
        EXACT,
    ),
}


def _quantized(weights: WeightScheme | None, activations: ActivationScheme | None) -> nn.Module:
    model = tiny_model("llama", **TINY)
    calib = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    ctx = StageContext(get_adapter(model), torch.device("cpu"), calibration_ids=calib, batch_size=4)
    return quantize(model, QuantizeConfig(weights=weights, activations=activations), ctx)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def _plain_load(folder: Path, weights: WeightScheme | None) -> nn.Module:
    # transformers 5.24 + compressed-tensors 0.20.1 build asymmetric pack-quantized layers with
    # an unpacked zero point before loading, so the default path rejects the packed one on disk
    # (see test_asymmetric_default_path_is_an_upstream_bug); the dequantize path reads it right.
    asym_packed = weights is not None and not weights.symmetric and weights.granularity != "tensor"
    kwargs = (
        {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym_packed else {}
    )
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # the dequantize option
@pytest.mark.parametrize("case", list(CASES))
def test_plain_transformers_matches_tersa(tmp_path: Path, case: str) -> None:
    weights, activations, fmt, tol = CASES[case]
    model = _quantized(weights, activations)
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert qc["tersa"] == {"format": "tersa", "version": 1}
    assert qc["ignore"] == ["lm_head"]

    ids = torch.randint(0, 300, (2, 13))
    ref = _logits(model, ids)
    plain = _plain_load(tmp_path, weights)
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    assert _rel(ref, _logits(plain, ids)) <= tol
    if weights is not None:  # decompressed by the first forward (or at load)
        ours = model.model.layers[1].mlp.down_proj.dequantized_weight()
        assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, ours)

    loaded = load_export(tmp_path)
    assert torch.equal(_logits(loaded, ids), ref)
    down = loaded.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear)
    if weights is not None:
        assert down.weight_packed.dtype == torch.int32 and not hasattr(down, "weight")
        assert torch.equal(down.weight_packed, model.model.layers[1].mlp.down_proj.weight_packed)


def test_compressed_tensors_export_from_another_tool(tmp_path: Path) -> None:
    """load_export also reads a compressed-tensors export tersa did not write: no ``tersa`` key,
    targets by class name minus ``ignore``, no per-group format (compressed-tensors then infers
    int-quantized for W4A8: int8 codes stored unpacked)."""
    model = _quantized(_group(4, 64, True), ActivationScheme())
    save_export(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    del qc["tersa"]
    qc["format"] = "int-quantized"
    qc["config_groups"]["group_0"].update(targets=["Linear"], format=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        shape = torch.Size(tensors.pop(f"{name}.weight_shape").tolist())
        tensors[f"{name}.weight"] = unpack_from_int32(tensors.pop(key), 4, shape)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    assert not is_tersa_export(tmp_path)
    ids = torch.randint(0, 300, (2, 13))
    ref = _logits(model, ids)
    assert _rel(ref, _logits(_plain_load(tmp_path, None), ids)) <= PER_TOKEN  # a valid export
    loaded = load_export(tmp_path)
    assert torch.equal(_logits(loaded, ids), ref)
    assert loaded.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.int32


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="upstream: packed zero point")
def test_asymmetric_default_path_is_an_upstream_bug(tmp_path: Path) -> None:
    """compressed-tensors 0.20.1 compresses the meta skeleton without packing the zero point
    (``[out, G]`` int8) while it writes and decompresses it packed (``[out·bits/32, G]`` int32);
    transformers then refuses the size mismatch. When this passes, drop the dequantize workaround.
    """
    save_export(_quantized(_group(4, 32, False), None), tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("width", [1, 7, 33, 176])
def test_dense_packing_is_tersa_packing(bits: int, width: int) -> None:
    """For bit widths dividing 32 no code crosses a word: the stored words need no conversion."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (5, width), dtype=torch.int8)
    assert torch.equal(pack_to_int32(codes, bits), pack_int32(codes, bits))


@pytest.mark.parametrize("case", ["w8a8-token", "w4a8-g128-token"])
def test_per_token_gap_is_only_the_step(tmp_path: Path, case: str, monkeypatch) -> None:
    """With tersa's per-token step (``max|x| / 127``) put into compressed-tensors' reference
    quantizer, plain transformers reproduces tersa's logits to float rounding."""

    def tersa_step(value: torch.Tensor, args, module, global_scale=None):
        lo, hi = value.amin(dim=-1, keepdim=True), value.amax(dim=-1, keepdim=True)
        return compute_qparams(lo, hi, args.num_bits, args.symmetric, value.dtype)

    weights, activations, _, _ = CASES[case]
    model = _quantized(weights, activations)
    save_export(model, tmp_path)
    monkeypatch.setattr(ct_forward, "compute_dynamic_scales_and_zp", tersa_step)
    ids = torch.randint(0, 300, (2, 13))
    assert _rel(_logits(model, ids), _logits(_plain_load(tmp_path, weights), ids)) <= EXACT
