"""tersa train: recipe checks, schedule, batches, tokenizer, resume, outputs and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tersa.cli import main
from tersa.errors import RecipeError
from tersa.kv import RatPlusForCausalLM
from tersa.kv.train import load_train_recipe, parse_train_recipe, train, train_tokenizer
from tersa.kv.train.data import batch_at, local_rows
from tersa.kv.train.optim import lr_at
from tersa.loading import open_model
from tests.helpers import write_text
from tests.kv.train_helpers import tiny_train_recipe, write_train_recipe

RECIPES = Path(__file__).parent.parent.parent / "tersa" / "recipes"
BASE = {"training": {"tokens": 8192, "seq_len": 64, "batch_size": 2}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: with 2 intra-op threads on a busy 2-core machine each backward of this
    40k-parameter model took ~1 s (threads waiting on each other), with one ~10 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _err(data: dict) -> str:
    with pytest.raises(RecipeError) as e:
        parse_train_recipe(data, source="r.yaml")
    return str(e.value)


def test_shipped_twins_differ_only_in_the_attention() -> None:
    rat = load_train_recipe(RECIPES / "ratplus-shakespeare.yaml").to_dict()
    assert parse_train_recipe(rat).to_dict() == rat  # the resolved recipe parses back to itself
    att = load_train_recipe(RECIPES / "attention-shakespeare.yaml").to_dict()
    assert (
        rat["model"].pop("attention") == "ratplus" and att["model"].pop("attention") == "attention"
    )
    assert (
        rat.pop("joint") == {"dilation": 64, "window": 0, "sinks": 0} and att.pop("joint") is None
    )
    assert rat == att  # same data, tokenizer, tokens, batches, schedule, seed
    assert rat["model"]["forget_gate_bias_init"] == 3.0 and rat["training"]["seq_len"] >= 1024


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"training": {"tokens": 8192, "seq_lenn": 3}},
         "r.yaml: training.seq_lenn: unknown key 'seq_lenn'; allowed: tokens, seq_len, batch_size, "
         "lr, min_lr, warmup, weight_decay, betas, grad_clip, seed, checkpoint_every, log_every"),
        ({**BASE, "bogus": 1},
         "r.yaml: bogus: unknown key 'bogus'; allowed: training, version, model, tokenizer, data, "
         "joint, adapt"),
        ({"training": {"tokens": "10"}}, "r.yaml: training.tokens: input should be a valid integer (got '10')"),
        ({**BASE, "model": {"attention": "rnn"}},
         "r.yaml: model.attention: input should be 'ratplus' or 'attention' (got 'rnn')"),
        ({**BASE, "model": {"attention": "attention"}},
         "r.yaml: joint: active recurrence learning needs model.attention: ratplus; set 'joint: null' "
         "for the attention twin"),
        ({"training": {"tokens": 100}},
         "r.yaml: training.tokens (100) is less than one batch (batch_size × seq_len = 8192)"),
        ({**BASE, "joint": {"dilation": 1}},
         "r.yaml: joint.dilation: input should be greater than or equal to 2 (got 1)"),
        ({**BASE, "model": {"hidden": 100, "heads": 3}},
         "r.yaml: model: hidden (100) must be a multiple of heads (3)"),
        ({**BASE, "adapt": {"tokens": 8192, "pattern": {"dilation": 4}, "layers": []}},
         "r.yaml: adapt: give exactly one of pattern (every layer) and layers (per layer)"),
        ({**BASE, "adapt": {"tokens": 8192, "layers": [{"dilation": 4}]}},
         "r.yaml: adapt.layers needs one pattern per layer, 4 (model.layers), got 1"),
        ({**BASE, "adapt": {"tokens": 8192, "pattern": {"dilation": 4, "windw": 2}}},
         "r.yaml: adapt.pattern.windw: unknown key 'windw'; allowed: dilation, window, sinks"),
        ({"stages": []}, "r.yaml: this is a compression recipe (it has 'stages'); run it with `tersa run`"),
        ({"model": {}}, "r.yaml: missing key 'training' (at least training.tokens, the token budget)"),
    ],
)  # fmt: skip
def test_recipe_rejections_name_the_key(data: dict, message: str) -> None:
    assert _err(data) == message


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    lrs = [lr_at(s, 100, 1e-3, 1e-5, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(1e-5) and lrs[10] == pytest.approx(1e-3)


def test_batches_are_a_function_of_seed_and_step() -> None:
    ids = torch.arange(1000)
    a, b = batch_at(ids, 7, 4, 32, seed=3), batch_at(ids, 7, 4, 32, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 32)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 31, dtype=torch.long))  # contiguous
    assert not torch.equal(a, batch_at(ids, 8, 4, 32, seed=3))
    assert torch.equal(torch.cat([local_rows(a, r, 2) for r in range(2)]), a)


def test_tokenizer_is_deterministic_and_loads_with_autotokenizer(tmp_path: Path) -> None:
    text = write_text(tmp_path / "t.txt").read_text()
    for name in ("a", "b"):
        train_tokenizer(text, vocab_size=300).save_pretrained(tmp_path / name)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (
        tmp_path / "b/tokenizer.json"
    ).read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok("Now is the winter ☃", add_special_tokens=False)["input_ids"]
    assert len(tok) == 300 and tok.decode(ids) == "Now is the winter ☃"
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    text = write_text(tmp_path / "t.txt")
    adapt = {"tokens": 2 * 128, "pattern": {"dilation": 4, "window": 2}}
    recipe = parse_train_recipe(tiny_train_recipe(text, batches=5, adapt=adapt))  # 5 + 2 batches
    whole = train(recipe, tmp_path / "whole")
    part = train(recipe, tmp_path / "split", stop_after=3)
    assert not part.finished and not (tmp_path / "split").exists()
    [ckpt] = (tmp_path / ".split.work").glob("checkpoint-*")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "trainer.json"
    ]  # fmt: skip
    resumed = train(recipe, tmp_path / "split", resume=True)
    a = load_file(str(tmp_path / "whole/model.safetensors"))
    b = load_file(str(tmp_path / "split/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics["log"] == resumed.metrics["log"] and resumed.step == 7
    assert not (tmp_path / ".split.work").exists()  # the work area goes once the output is written
    config = json.loads((tmp_path / "whole/config.json").read_text())
    assert config["kv_pattern"] == {"dilation": 4, "window": 2, "sinks": 0}  # the adapted target


def test_cli_train_output_loads_everywhere(tmp_path: Path, monkeypatch, capsys) -> None:
    recipe = write_train_recipe(tmp_path, training={"tokens": 2 * 128})
    out = tmp_path / "cache" / "models" / "tiny-ratplus"
    assert main(["train", str(recipe), "--output", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out nll dense" in stdout and f"wrote {out}" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and set(metrics["eval"]) == {"nll_dense", "nll_joint"}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["tokens"] == 256
    model = AutoModelForCausalLM.from_pretrained(out)  # `import tersa` registered ratplus
    assert isinstance(model, RatPlusForCausalLM)
    monkeypatch.setenv("TERSA_CACHE", str(tmp_path / "cache"))
    loaded, tok, folder = open_model("trained:tiny-ratplus")
    assert isinstance(loaded, RatPlusForCausalLM) and folder == out and len(tok) == 300
    assert math.isfinite(metrics["eval"]["nll_dense"])


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, " ".join(capsys.readouterr().err.split())


def test_cli_bad_input_exits_2_with_one_message(tmp_path: Path, capsys) -> None:
    code, err = _cli(["train", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "does not exist; give the path of a training recipe YAML file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {tokens: 8192, lr: fast}\n")
    code, err = _cli(["train", str(bad)], capsys)
    assert code == 2 and "training.lr: input should be a valid number" in err
    code, err = _cli(["train", str(RECIPES / "default.yaml")], capsys)
    assert code == 2 and "this is a compression recipe" in err
    code, err = _cli(["run", str(RECIPES / "ratplus-shakespeare.yaml")], capsys)
    assert code == 2 and "this is a training recipe; run it with `tersa train`" in err
    recipe = write_train_recipe(tmp_path)
    (tmp_path / "out").mkdir()
    code, err = _cli(["train", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / ".out.work").exists()
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2
