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
from tersa.eval.numerics import err_ratio
from tersa.kv import RatPlusForCausalLM
from tersa.kv.train import load_train_recipe, parse_train_recipe, train, train_tokenizer
from tersa.kv.train.converted import convert_source
from tersa.kv.train.data import batch_at, local_rows
from tersa.kv.train.optim import lr_at
from tersa.loading import open_model
from tests.helpers import tiny_setup, write_text
from tests.kv.train_helpers import tiny_init_recipe, tiny_train_recipe, write_train_recipe

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


TRAINING_RECIPES = sorted(
    p for p in RECIPES.glob("*.yaml") if "training" in yaml.safe_load(p.read_text())
)


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=[p.name for p in TRAINING_RECIPES])
def test_shipped_training_recipes_parse_and_round_trip(path: Path) -> None:
    recipe = load_train_recipe(path).to_dict()
    assert parse_train_recipe(recipe).to_dict() == recipe


def test_shipped_conversion_recipe_continues_smollm2() -> None:
    recipe = load_train_recipe(RECIPES / "ratplus-from-smollm2.yaml")  # parsed only: no training
    assert recipe.init is not None and recipe.init.source == "embedded:smollm2-135m"
    assert recipe.init.forget_gate_bias_init <= -6.0  # k̃ ≈ k: starts as SmolLM2
    assert recipe.model is None and recipe.tokenizer is None
    assert recipe.joint is not None and recipe.joint.dilation == 64
    assert recipe.data.source == "embedded:shakespeare" and recipe.data.split == "calibration"
    assert 16384 <= recipe.training.tokens <= 65536 and recipe.training.seq_len == 256


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"training": {"tokens": 8192, "seq_lenn": 3}},
         "r.yaml: training.seq_lenn: unknown key 'seq_lenn'; allowed: tokens, seq_len, batch_size, "
         "lr, min_lr, warmup, weight_decay, betas, grad_clip, seed, checkpoint_every, log_every"),
        ({**BASE, "bogus": 1},
         "r.yaml: bogus: unknown key 'bogus'; allowed: training, version, init, model, tokenizer, "
         "data, joint, adapt"),
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
        ({**BASE, "init": {"source": "m"}, "model": {"layers": 2}},
         "r.yaml: init: the architecture and the tokenizer come from init.source; remove 'model' "
         "(or remove init to train from scratch)"),
        ({**BASE, "init": {"source": "m"}, "model": {}, "tokenizer": {"vocab_size": 300}},
         "r.yaml: init: the architecture and the tokenizer come from init.source; remove 'model' "
         "and 'tokenizer' (or remove init to train from scratch)"),
        ({**BASE, "init": {"source": "m", "forget_gate_bias": -6.0}},
         "r.yaml: init.forget_gate_bias: unknown key 'forget_gate_bias'; allowed: source, "
         "forget_gate_bias_init"),
        ({**BASE, "init": {}}, "r.yaml: init.source: missing required key"),
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


def test_init_converts_the_checkpoint_so_training_starts_from_its_outputs(tmp_path: Path) -> None:
    checkpoint, text = tiny_setup(tmp_path)
    llama, llama_tok, _ = open_model(str(checkpoint))
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llama(ids).logits
    for bias in (-30.0, None):  # σ(-30) = 1e-13: exactly the Llama; default -6: k̃ ≈ k
        init = {} if bias is None else {"forget_gate_bias_init": bias}
        model, tok = convert_source(
            parse_train_recipe(tiny_init_recipe(checkpoint, text, init=init))
        )
        assert isinstance(model, RatPlusForCausalLM) and tok.get_vocab() == llama_tok.get_vocab()
        gate = model.model.layers[1].self_attn.forget_gate_proj
        assert torch.all(gate.bias == (bias or -6.0)) and not gate.weight.any()
        with torch.no_grad():
            got = model(ids).logits
        if bias is None:  # g = σ(-6) ≈ 0.0025 mixes the past in a little (as in test_convert.py)
            assert err_ratio(want, got) < 2e-3 and torch.equal(want.argmax(-1), got.argmax(-1))
        else:
            assert (got - want).abs().max() < 1e-4


def test_cli_init_trains_the_converted_checkpoint(tmp_path: Path, capsys) -> None:
    checkpoint, text = tiny_setup(tmp_path)
    recipe = tmp_path / "init.yaml"
    recipe.write_text(yaml.safe_dump(tiny_init_recipe(checkpoint, text, batches=2)))
    out = tmp_path / "out"
    assert main(["train", str(recipe), "--output", str(out), "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model, tok, _ = open_model(str(out))
    llama, llama_tok, _ = open_model(str(checkpoint))
    assert isinstance(model, RatPlusForCausalLM) and model.config.recurrent
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")  # fmt: skip
    assert {k: getattr(model.config, k) for k in sizes} == {
        k: getattr(llama.config, k) for k in sizes
    }
    assert tok.get_vocab() == llama_tok.get_vocab() and len(tok) == 271  # not a 300-token BPE
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["attention"] == "ratplus"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["init"]["source"] == str(checkpoint) and saved["model"] is None
    assert not (out.parent / ".out.work").exists()


def test_init_resume_restores_the_checkpoint_without_converting_again(
    tmp_path: Path, monkeypatch
) -> None:
    checkpoint, text = tiny_setup(tmp_path)
    recipe = parse_train_recipe(tiny_init_recipe(checkpoint, text, batches=5))
    whole = train(recipe, tmp_path / "whole")
    part = train(recipe, tmp_path / "split", stop_after=3)
    assert not part.finished and (tmp_path / ".split.work/init/config.json").is_file()

    def no_conversion(recipe):
        raise AssertionError("resume converted the source again")

    monkeypatch.setattr("tersa.kv.train.converted.convert_source", no_conversion)
    resumed = train(recipe, tmp_path / "split", resume=True)
    a = load_file(str(tmp_path / "whole/model.safetensors"))
    b = load_file(str(tmp_path / "split/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics["log"] == resumed.metrics["log"] and resumed.step == 5
    bias = a["model.layers.0.self_attn.forget_gate_proj.bias"]
    assert not torch.all(bias == -6.0)  # trained away from the conversion


def test_init_refuses_other_architectures_with_exit_2(tmp_path: Path, capsys) -> None:
    checkpoint, text = tiny_setup(tmp_path, family="gpt2")
    recipe = tmp_path / "init.yaml"
    recipe.write_text(yaml.safe_dump(tiny_init_recipe(checkpoint, text)))
    code, err = _cli(["train", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and err == (
        f"error: init.source: '{checkpoint}' is a gpt2 model; only Llama-family checkpoints "
        "convert to RAT+ (model_type llama or mistral)"
    )
    assert not (tmp_path / "out").exists()


def test_init_refuses_a_seq_len_beyond_the_checkpoints_positions(tmp_path: Path) -> None:
    checkpoint, text = tiny_setup(tmp_path)
    data = tiny_init_recipe(checkpoint, text, training={"seq_len": 512, "tokens": 2048})
    with pytest.raises(RecipeError) as e:
        train(parse_train_recipe(data), tmp_path / "out")
    assert str(e.value) == (
        "training.seq_len (512) exceeds the max_position_embeddings of init.source (256)"
    )
