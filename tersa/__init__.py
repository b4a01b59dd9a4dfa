"""tersa: make large language models smaller and faster.

Importing tersa registers ``quant_method: tersa`` with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads tersa exports with tersa's modules
(:mod:`tersa.export.hf_quantizer`), and ``model_type: ratplus`` with the Auto classes
(:mod:`tersa.kv`), so RAT+ checkpoints load with ``AutoModelForCausalLM`` too.
"""

import tersa.kv  # noqa: F401  (registers ratplus with AutoConfig / AutoModelForCausalLM)
from tersa.export.hf_quantizer import register as _register_transformers_quantizer

_register_transformers_quantizer()
