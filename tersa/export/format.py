"""The tersa export format, version 0.

An export is a Hugging Face model folder:

- ``model.safetensors``: every tensor of the compressed model once (tied weights stored once). A
  quantized linear ``NAME`` stores ``NAME.weight_packed`` (int32, codes packed as in
  compressed-tensors ``pack-quantized``), ``NAME.weight_scale``, ``NAME.weight_zero_point``
  (asymmetric only), ``NAME.bias`` and, for static activations, ``NAME.input_scale`` /
  ``NAME.input_zero_point``. The safetensors metadata holds ``format: pt`` and ``tersa_version``.
- ``config.json``: the model's transformers config plus, when anything is quantized,
  ``quantization_config = {"quant_method": "tersa", "version": 0, "layers": {NAME: LAYER}}`` where
  ``LAYER = {"in_features", "out_features", "bias", "weights": WeightScheme | null,
  "activations": ActivationScheme | null}``. Plain transformers refuses the unknown quant_method
  instead of loading random weights; tersa's loader builds the quantized modules.
- tokenizer files, ``recipe.yaml`` (the resolved recipe) and ``metrics.json``.
"""

from __future__ import annotations

QUANT_METHOD = "tersa"
FORMAT_VERSION = 0
SUPPORTED_VERSIONS = (0,)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
