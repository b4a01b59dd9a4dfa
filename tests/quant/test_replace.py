"""Finding linears by dotted name with ignore patterns, and swapping modules in place."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tersa.eval.numerics import sqnr_db
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import (
    find_linears,
    is_linear,
    linear_weight,
    name_matches,
    replace_linear,
)
from tersa.quant.scheme import WeightScheme


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Conv1D(24, 12)  # GPT-2 style: nf=out 24, nx=in 12
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(24, 20), "down_proj": nn.Linear(20, 12)})
        self.norm = nn.LayerNorm(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm(x))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](h)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 12)
        self.layers = nn.ModuleList(Block() for _ in range(11))
        self.lm_head = nn.Linear(12, 10, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("layers.0.mlp.down_proj", ["*.mlp.down_proj"], True),
        ("layers.0.mlp.down_proj_x", ["*.mlp.down_proj"], False),  # globs match the whole name
        ("layers.0.mlp.up_proj", ["layers.0.*"], True),
        ("layers.10.mlp.up_proj", ["layers.0.*"], False),
        ("lm_head", ["lm_head"], True),
        ("model.lm_head", ["lm_head"], False),
        ("layers.3.mlp.down_proj", ["re:down_proj$"], True),  # regexes are searched
        ("layers.3.mlp.down_proj.x", ["re:down_proj$"], False),
        ("layers.3.attn", ["re:layers\\.[0-3]\\.attn"], True),
        ("layers.3.attn", ["*.mlp.*", "re:^layers\\.3\\."], True),
        ("layers.3.attn", [], False),
    ],
)
def test_name_matches(name: str, patterns: list[str], expected: bool) -> None:
    assert name_matches(name, patterns) is expected


def test_find_linears_all() -> None:
    found = find_linears(Toy())
    assert len(found) == 11 * 3 + 1
    assert list(found)[:4] == [
        "layers.0.attn",
        "layers.0.mlp.up_proj",
        "layers.0.mlp.down_proj",
        "layers.1.attn",
    ]
    assert isinstance(found["layers.4.attn"], Conv1D) and "embed" not in found


def test_find_linears_ignore_and_relative_names() -> None:
    model = Toy()
    found = find_linears(model, ignore=["lm_head", "re:down_proj$", "layers.1.*"])
    assert "lm_head" not in found and "layers.10.attn" in found
    assert not any(n.endswith("down_proj") or n.startswith("layers.1.") for n in found)
    assert len(found) == 10 * 2
    assert list(find_linears(model.layers[2])) == ["attn", "mlp.up_proj", "mlp.down_proj"]


def test_is_linear_and_linear_weight() -> None:
    conv, lin = Conv1D(24, 12), nn.Linear(12, 24)
    assert is_linear(conv) and is_linear(lin) and not is_linear(nn.LayerNorm(4))
    assert linear_weight(conv).shape == (24, 12) == linear_weight(lin).shape
    assert linear_weight(conv).data_ptr() == conv.weight.data_ptr()  # a view, no copy
    with pytest.raises(TypeError, match="LayerNorm"):
        linear_weight(nn.LayerNorm(4))


def test_replace_linear_nested_path() -> None:
    model = Toy()
    old = model.layers[3].mlp["down_proj"]
    new = nn.Linear(20, 12)
    assert replace_linear(model, "layers.3.mlp.down_proj", new) is old
    assert model.layers[3].mlp["down_proj"] is new
    top = nn.Linear(12, 10)
    replace_linear(model, "lm_head", top)
    assert model.lm_head is top


def test_replace_linear_rejects_bad_paths() -> None:
    model = Toy()
    with pytest.raises(AttributeError):
        replace_linear(model, "layers.3.mlp.gate_proj", nn.Linear(1, 1))
    with pytest.raises(ValueError, match="non-empty"):
        replace_linear(model, "", nn.Linear(1, 1))


def test_quantize_every_linear_end_to_end() -> None:
    model = Toy()
    ids = torch.randint(0, 10, (1, 7))
    ref = model(ids)
    for name, layer in find_linears(model, ignore=["lm_head"]).items():
        replace_linear(model, name, QuantLinear.from_float(layer, WeightScheme(bits=8), None))
    assert len(find_linears(model)) == 1  # only lm_head is left as a float linear
    assert sqnr_db(ref, model(ids)) > 30  # 33 int8 layers, ~40 dB each
