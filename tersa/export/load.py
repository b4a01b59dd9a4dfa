"""Load a tersa export back into a model whose quantized linears keep their packed weights.

The model is built with empty (meta) parameters, the modules the config names are swapped in
(:mod:`tersa.export.build`), every stored tensor's shape and dtype is checked against them, and the
safetensors tensors are assigned in place, so no second copy of the weights is ever allocated (a
lossless export's ``model.tersa`` is decoded into memory first, then assigned the same way).
Quantized linears stored in a compressed-tensors layout are then converted to tersa's, one layer at
a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from tersa.compress.lossless import read_container
from tersa.compress.lossless.spec import RETIRED_VERSIONS as LOSSLESS_RETIRED
from tersa.compress.lossless.spec import SUPPORTED_VERSIONS as LOSSLESS_VERSIONS
from tersa.errors import ExportError
from tersa.export.build import check_tensor_specs, finish_modules, place_modules, tensor_specs
from tersa.export.format import (
    CONFIG_FILE,
    LOSSLESS_FILE,
    LOSSLESS_KEY,
    TERSA_KEY,
    TERSA_METHOD,
    WEIGHTS_FILE,
)
from tersa.export.qconfig import read_plan
from tersa.models.load import auto_class


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict; :class:`ExportError` when it is missing or not JSON."""
    path = folder / CONFIG_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"'{folder}' has no {CONFIG_FILE}; is it a model folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"'{path}' is not valid JSON ({e}); re-export the model") from None


def is_tersa_export(folder: Path) -> bool:
    """Whether ``folder`` holds an export tersa wrote (either quant_method) or a version-0 one."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    return is_tersa_config(read_config(folder).get("quantization_config"))


def is_tersa_config(qc: object) -> bool:
    """Whether a ``quantization_config`` was written by tersa (any version)."""
    return isinstance(qc, dict) and (qc.get("quant_method") == TERSA_METHOD or TERSA_KEY in qc)


def load_export(folder: str | Path) -> nn.Module:
    """Rebuild the compressed model stored in ``folder`` (eval mode, on the CPU).

    Reads tersa's exports and compressed-tensors exports whose schemes tersa has (integer weights
    per tensor, channel or group; dynamic per-token or static per-tensor integer inputs).
    """
    folder = Path(folder)
    raw = read_config(folder)
    qc = raw.get("quantization_config")
    config = _build_config(raw, folder)
    dtype = _config_dtype(config)
    auto = auto_class(config.model_type, getattr(config, "architectures", None))
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=dtype)
    plan = read_plan(qc, str(folder)) if qc else None
    placed = place_modules(model, plan, str(folder)) if plan else {}
    if lossless_file(qc, str(folder)):
        # as many decoding threads as torch may use (OMP_NUM_THREADS, torch.set_num_threads)
        tensors, _ = read_container(folder / LOSSLESS_FILE, workers=torch.get_num_threads())
    else:
        tensors = _read_tensors(folder / WEIGHTS_FILE)
    _check_tensors(model, tensors, folder)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    _check_materialized(model, folder)
    finish_modules(model, placed, str(folder))
    if plan is not None and plan.kv_policy is not None:
        apply_saved_policy(model, plan.kv_policy)
    return model.eval()


def apply_saved_policy(model: nn.Module, policy: dict[str, Any]) -> None:
    """Put an export's KV policy (``quantization_config.tersa.kv_policy``) on the loaded model."""
    from tersa.kv.policies import apply_kv_policy  # tersa.kv imports the RAT+ model: lazily

    apply_kv_policy(model, policy)


def lossless_file(qc: object, where: str) -> str | None:
    """``model.tersa`` when ``quantization_config.tersa.lossless`` says the tensors are in the
    lossless container (checked: that file name and a container version this tersa reads)."""
    section = qc.get(TERSA_KEY) if isinstance(qc, dict) else None
    record = section.get(LOSSLESS_KEY) if isinstance(section, dict) else None
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("file") != LOSSLESS_FILE:
        raise ExportError(
            f"'{where}': quantization_config.tersa.lossless must be "
            f'{{"file": "{LOSSLESS_FILE}", "version": N}}, not {record!r}; re-export the model'
        )
    if record.get("version") in LOSSLESS_RETIRED:
        raise ExportError(
            f"'{where}' stores its tensors in lossless container version {record['version']}, "
            f"written by an earlier tersa and no longer read (this tersa reads "
            f"{', '.join(map(str, LOSSLESS_VERSIONS))}); export the model again"
        )
    if record.get("version") not in LOSSLESS_VERSIONS:
        raise ExportError(
            f"'{where}' stores its tensors in lossless container version "
            f"{record.get('version')!r}; this tersa reads "
            f"{', '.join(map(str, LOSSLESS_VERSIONS))} — upgrade tersa"
        )
    return LOSSLESS_FILE


def _build_config(raw: dict[str, Any], folder: Path) -> PretrainedConfig:
    plain = {k: v for k, v in raw.items() if k != "quantization_config"}
    model_type = plain.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **plain)
    except (ValueError, KeyError) as e:
        raise ExportError(f"'{folder}/{CONFIG_FILE}' is not a usable model config: {e}") from None


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"'{path.parent}' has no {WEIGHTS_FILE}; the export is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"'{path}' is not a readable safetensors file ({e}); re-export") from None


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = tensor_specs(model)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ExportError(
            f"'{folder}/{WEIGHTS_FILE}' holds tensors the config does not describe: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    stored = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    check_tensor_specs(expected, stored, f"{folder}/{WEIGHTS_FILE}")


def _check_materialized(model: nn.Module, folder: Path) -> None:
    missing = [n for n, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise ExportError(
            f"'{folder}/{WEIGHTS_FILE}' lacks tensors: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the export is incomplete"
        )
