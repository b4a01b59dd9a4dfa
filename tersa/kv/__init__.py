"""RAT+ and KV-cache sparsity.

Importing ``tersa.kv`` registers ``model_type: ratplus`` with ``AutoConfig`` and
``AutoModelForCausalLM``.

- :class:`RatPlusConfig`, :class:`RatPlusForCausalLM`: the model (:mod:`tersa.kv.modeling_ratplus`).
- :class:`KVPattern`: a layer's inference pattern, dilated / local / sinks (:mod:`tersa.kv.masks`).
- :class:`RatPlusCache`: the compact decode cache, with ``kv_bytes()`` (:mod:`tersa.kv.cache`).
- :func:`gated_scan`: the recurrence (:mod:`tersa.kv.scan`).
- :func:`llama_to_ratplus`: add the recurrence to a Llama checkpoint (:mod:`tersa.kv.convert`).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from tersa.kv.cache import RatPlusCache
from tersa.kv.configuration_ratplus import RatPlusConfig
from tersa.kv.convert import llama_to_ratplus
from tersa.kv.masks import KVPattern, cache_entries
from tersa.kv.modeling_ratplus import RatPlusForCausalLM, RatPlusModel
from tersa.kv.scan import gated_scan

AutoConfig.register(RatPlusConfig.model_type, RatPlusConfig, exist_ok=True)
AutoModelForCausalLM.register(RatPlusConfig, RatPlusForCausalLM, exist_ok=True)

__all__ = [
    "KVPattern",
    "RatPlusCache",
    "RatPlusConfig",
    "RatPlusForCausalLM",
    "RatPlusModel",
    "cache_entries",
    "gated_scan",
    "llama_to_ratplus",
]
