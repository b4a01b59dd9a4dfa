"""The tersa export format, version 1: compressed-tensors where it can say it, ``tersa`` elsewhere.

An export is a Hugging Face model folder: ``model.safetensors`` (every tensor once; tied weights are
stored once; metadata ``{"format": "pt", "tersa_version": "1"}``), ``config.json``, the tokenizer,
``recipe.yaml`` (the resolved recipe) and ``metrics.json``. Nothing about the compression lives in
file names.

config.json carries the model's transformers config plus, when anything is quantized or changed,
``quantization_config``::

    {
      "quant_method": "compressed-tensors",           # or "tersa", see below
      "format": "pack-quantized",                     # one format, or "mixed-precision"
      "quantization_status": "compressed",
      "config_groups": {
        "group_0": {
          "targets": ["model.layers.0.mlp.down_proj", ...],   # exact module names
          "weights": {"num_bits": 4, "type": "int", "symmetric": false, "strategy": "group",
                      "group_size": 128, "dynamic": false},
          "input_activations": null,                  # or {"num_bits": 8, "strategy": "token",
                                                      #     "dynamic": true, ...}
          "output_activations": null,
          "format": "pack-quantized"
        }
      },
      "ignore": ["lm_head"],                           # every float nn.Linear
      "kv_cache_scheme": null, ...,                    # compressed-tensors defaults
      "tersa": {"format": "tersa", "version": 1, ...}  # always present (tersa wrote it)
    }

The compressed-tensors fields are built and validated with compressed-tensors' own pydantic models
(``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs``). Each group's ``format``
says how its tensors are stored (per layer ``NAME``):

- ``pack-quantized`` (every weight scheme but 8-bit weights with quantized inputs):
  ``NAME.weight_packed`` int32 ``[out, ceil(in·bits/32)]``: the signed codes plus ``2^(bits-1)``,
  packed densely (code ``i`` at bit ``i·bits`` of the row, across word boundaries; for 2, 4 and 8
  bits that is exactly tersa's in-memory packing); ``NAME.weight_shape`` int64 ``[out, in]``;
  ``NAME.weight_scale`` ``[out, G]`` (group), ``[out, 1]`` (channel) or ``[1]`` (tensor);
  asymmetric: ``NAME.weight_zero_point``, for group and channel packed the same way along the
  output dimension (int32 ``[ceil(out·bits/32), G]``), for tensor int8 ``[1]``.
- ``int-quantized`` (8-bit weights with quantized activations, e.g. W8A8): ``NAME.weight`` int8
  ``[out, in]``, ``NAME.weight_scale`` as above, ``NAME.weight_zero_point`` int8 (asymmetric).
- ``dense`` (activations only): the float ``NAME.weight``.

Codes, scales and zero points follow one convention in both tools: ``x̂ = (q − z)·s`` with signed
codes ``q`` and int8 zero points. Dynamic per-token activations (``strategy: token``) are computed
at run time; static ones (``strategy: tensor``) store ``NAME.input_scale`` ``[1]`` and, asymmetric,
``NAME.input_zero_point`` int8 ``[1]``. A bias is ``NAME.bias``. compressed-tensors' reference
computes a symmetric per-token scale as ``max|x|/(2^(b-1) − ½)`` where tersa (and int8 kernels) use
``max|x|/(2^(b-1) − 1)``, so under plain transformers such layers differ by that rounding only.

``quant_method`` is ``compressed-tensors`` when the config groups describe the whole model, so plain
transformers + compressed-tensors loads the folder (asymmetric ``pack-quantized`` layers need
``CompressedTensorsConfig(dequantize=True)`` with transformers 5.24 / compressed-tensors 0.20.1,
whose default path expects an unpacked zero point). It is ``tersa`` when anything below is present,
so that no compressed-tensors loader uses the groups and silently drops the rest. ``import tersa``
registers a transformers quantizer for it (:mod:`tersa.export.hf_quantizer`); without it,
transformers 5 does not raise but warns of an unknown quantization type and reports every quantized
weight missing (randomly initialised). The ``tersa`` key holds, besides ``format`` and ``version``:

- ``layers``: ``{NAME: {"in_features", "out_features", "bias", "weights": WeightScheme | null,
  "activations": ActivationScheme | null}}`` for quantized layers compressed-tensors cannot
  describe, stored in tersa's own layout (the :class:`~tersa.quant.qlinear.QuantLinear` state dict:
  ``weight_packed`` int32 ``[out, ceil(in / (32 // bits))]``, ``32 // bits`` codes per word, low
  bits first; ``weight_scale``; int8 ``weight_zero_point``; ``input_scale`` / ``input_zero_point``).
  That is a group size that does not divide ``in_features`` (compressed-tensors needs equal
  groups) or a layer that replaces a transformers ``Conv1D`` (GPT-2; its weight is ``[in, out]``).
- ``smooth``: ``{NAME: "scale" | "scale_shift"}``, quantized layers (of either kind) that divide
  their input by ``NAME.smooth_scale`` ``[in]`` after subtracting ``NAME.smooth_shift`` ``[in]``
  (OS+ / SmoothQuant on post-norm models).
- ``smoothed`` / ``smoothed_shifts``: float :class:`~tersa.quant.smoothed.SmoothedLinear` layers
  (and those with a shift); ``biased_norms``: RMSNorms that gained a ``bias`` (OS+ shift);
  ``added_biases``: linears (float or quantized) that gained a bias their architecture lacks (a
  compressed-tensors loader would drop ``NAME.bias`` as unexpected).
- ``structured``: ``{NAME: {"kind": "lowrank" | "blockdense" | "blockshuffle", "in_features",
  "out_features", "rank", "blocks", "bias", "merge_below"}}``, structured layers
  (:mod:`tersa.structured`) in place of the linear ``NAME``. Their factors are linears of their
  own: ``NAME.v.weight`` / ``NAME.u.weight`` (LowRank; BlockDense's ``v`` is block diagonal,
  ``NAME.v.linears.K.weight`` per block), ``NAME.w1.linears.K.weight`` /
  ``NAME.w2.linears.K.weight`` (BlockShuffle), plus ``NAME.bias``. A quantized factor is a
  quantized layer like any other (a config group target or a ``layers`` entry) at its own name;
  loaders place the structured layers first (see :mod:`tersa.export.structured`).
- ``l2``: ``{NAME: {"in_features", "out_features", "bias", "codes_dtype"}}``, L2 layers
  (:class:`~tersa.compress.l2.layer.L2Linear`) in place of the linear ``NAME``:
  ``NAME.weight_codes`` ``[out, in]`` integer codes (``codes_dtype``: int8, int16 or int32),
  ``NAME.edge`` and ``NAME.step`` ``[1]``, ``NAME.bias``; code ``k`` stands for
  ``sign(k)(|e| + (|k| − ½)|Δ|)`` and 0 for 0 (see :mod:`tersa.export.l2`).

- ``kv_policy``: ``{"name": "streaming" | "snapkv" | "quest" | "moba", "budget", ...options}``,
  the KV policy a ``kv`` stage set (:mod:`tersa.kv.policies`); loading puts it back on the model.
  It changes no tensor, but a compressed-tensors loader would drop it, so it makes the export
  ``quant_method: tersa`` (with a ``dense`` config and no groups when nothing is quantized).

- ``lossless``: ``{"file": "model.tersa", "version": 1}`` when the recipe set
  ``export: {lossless: true}``: the tensors (the same names, dtypes and shapes as above) are
  entropy-coded into that container (:mod:`tersa.compress.lossless`) instead of
  ``model.safetensors``. ``quant_method`` is then ``tersa`` (a model with nothing quantized gets a
  ``dense`` config with no groups), so no other loader reads the folder. Only
  :func:`tersa.export.load.load_export` decodes it (on the CPU); the transformers quantizer refuses
  it with a message naming ``load_export``.

Loading (:func:`tersa.export.load.load_export` and the transformers quantizer) builds the model on
the meta device, swaps in the modules the config names, checks every stored tensor's shape and dtype
against them, assigns the tensors and converts compressed-tensors layouts to tersa's in-memory one
layer by layer. An unknown ``tersa.format``, ``tersa.version`` or compressed-tensors ``format``, a
scheme tersa lacks, a target the model lacks and any tensor of the wrong shape or dtype are refused
with :class:`~tersa.errors.ExportError`. Version 0 (a per-layer table at the top level of
``quantization_config``) is no longer read: re-export those folders. ``load_export`` also reads
compressed-tensors exports of other tools when their schemes are tersa's (integer weights per
tensor, channel or group; dynamic per-token or static per-tensor integer inputs).
``AutoModelForCausalLM.from_pretrained`` on a ``compressed-tensors`` export keeps using
compressed-tensors' own modules, ``import tersa`` or not.
"""

from __future__ import annotations

FORMAT_NAME = "tersa"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TERSA_METHOD = "tersa"
CT_METHOD = "compressed-tensors"
TERSA_KEY = "tersa"
# Storage layouts of one layer: the compressed-tensors formats tersa reads and writes, and its own.
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
DENSE = "dense"
NATIVE = "tersa"
CT_FORMATS = (PACK_QUANTIZED, INT_QUANTIZED, DENSE)
MIXED = "mixed-precision"
WEIGHTS_FILE = "model.safetensors"
LOSSLESS_KEY = "lossless"
LOSSLESS_FILE = "model.tersa"  # tersa.compress.lossless.spec.CONTAINER_FILE
CONFIG_FILE = "config.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
