"""``quant_method: tersa`` for transformers: ``from_pretrained`` builds tersa's modules.

``import tersa`` calls :func:`register`, after which ``AutoModelForCausalLM.from_pretrained(folder)``
on a tersa-form export swaps :class:`~tersa.quant.qlinear.QuantLinear` (packed weights kept), biased
norms and the other extensions into the model transformers builds on the meta device, checks the
stored tensors' shapes and dtypes against them (from the safetensors headers), lets transformers
assign the tensors, and converts compressed-tensors layouts to tersa's. Saving such a model back
with ``save_pretrained`` is not supported: use :func:`tersa.export.save.save_export`. A lossless
export (tensors entropy-coded in ``model.tersa``) is refused up front, naming ``load_export``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from tersa.errors import ExportError
from tersa.export.format import LOSSLESS_FILE, LOSSLESS_KEY, TERSA_KEY, TERSA_METHOD

# ``import tersa`` imports this module; tersa.export.build (compressed-tensors, tersa.quant) is
# imported by the methods instead, so that only loading an export pays for it.


class TersaQuantizationConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` for ``quant_method: tersa``, kept as written."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)
        self.quant_method = TERSA_METHOD


class TersaHfQuantizer(HfQuantizer):
    """Loads tersa-form exports (already quantized; nothing is quantized at load time)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def __init__(self, quantization_config: TersaQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._placed: dict[str, str] = {}
        self._kv_policy: dict[str, Any] | None = None
        self._where = "the export"

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Refuse a lossless export before transformers looks for ``model.safetensors``."""
        section = getattr(self.quantization_config, TERSA_KEY, None)
        if isinstance(section, dict) and LOSSLESS_KEY in section:
            raise ExportError(
                f"this export stores its tensors entropy-coded in {LOSSLESS_FILE} "
                "(export: {lossless: true}), which transformers cannot read; load it with "
                "tersa.export.load.load_export(folder)"
            )

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> None:
        from tersa.export.build import place_modules
        from tersa.export.qconfig import read_plan

        self._where = str(getattr(model.config, "name_or_path", "") or "the export")
        plan = read_plan(self.quantization_config.to_dict(), self._where)
        self._placed = place_modules(model, plan, self._where)
        self._kv_policy = plan.kv_policy
        extras = {**plan.extras, "structured": list(plan.structured), "l2": list(plan.l2)}
        self._check_checkpoint(model, extras, checkpoint_files or [])
        _skip_parent_init(model, [*self._placed, *plan.structured, *plan.l2])

    def _check_checkpoint(
        self, model: nn.Module, extras: dict[str, list[str]], files: list[str]
    ) -> None:
        """Every tensor of a module tersa placed is stored, with the shape and dtype it needs.

        transformers would only report a missing tensor and leave its memory uninitialised.
        """
        from tersa.export.build import check_tensor_specs, header_specs, tensor_specs

        stored = {}
        for file in files:
            stored.update(header_specs(Path(file)))
        expected = {}
        for name in [*self._placed, *(n for names in extras.values() for n in names)]:
            expected.update(tensor_specs(model.get_submodule(name), f"{name}."))
        missing = sorted(set(expected) - set(stored))
        if missing:
            raise ExportError(
                f"'{self._where}' lacks tensors: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; the export is incomplete"
            )
        check_tensor_specs(expected, stored, self._where, float_cast=True)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from tersa.export.build import finish_modules

        finish_modules(model, self._placed, self._where)
        if self._kv_policy is not None:
            from tersa.export.load import apply_saved_policy

            apply_saved_policy(model, self._kv_policy)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _skip_parent_init(model: nn.Module, names: Iterable[str]) -> None:
    """Keep transformers' weight init off the parents of tersa's layers.

    After loading, transformers runs the model's ``_init_weights`` on every module not flagged
    initialised, and some reach into a child's weight (GPT-2 rescales ``attn.c_proj.weight`` and
    ``mlp.c_proj.weight``), which a QuantLinear or a structured layer does not have. A parent without tensors of its own has nothing else to
    initialise, so flagging it is safe; its children are still visited one by one.
    """
    for name in names:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        own = [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]
        if not own and parent is not model:
            parent._is_hf_initialized = True


def register() -> None:
    """Make transformers load ``quant_method: tersa`` with :class:`TersaHfQuantizer` (idempotent)."""
    if TERSA_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(TERSA_METHOD)(TersaQuantizationConfig)
    if TERSA_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(TERSA_METHOD)(TersaHfQuantizer)
