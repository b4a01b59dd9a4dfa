"""The activation outlier profile finds a planted outlier channel and leaves the model alone."""

import torch

from tersa.eval.outliers import outlier_profile
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model


def test_planted_outlier_channel_shows_in_the_profile() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] *= 80.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = outlier_profile(model, get_adapter(model), torch.randint(0, 300, (3, 17)), batch_size=2)
    assert len(rows) == 2 * 7
    ratio = {(r.block, r.linear): r.ratio for r in rows}
    assert ratio[(1, "mlp.gate_proj")] > 20
    assert ratio[(1, "mlp.gate_proj")] == ratio[(1, "mlp.up_proj")]
    assert ratio[(0, "mlp.gate_proj")] < 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
