"""The export's ``quantization_config``: written from a compressed model, read back into a plan.

See :mod:`tersa.export.format` for the layout. Writing groups the quantized linears by scheme into
compressed-tensors config groups (validated by its ``QuantizationConfig``) and puts what it cannot
express under the ``tersa`` key; reading validates all of it and returns an :class:`ExportPlan`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from pydantic import ValidationError
from torch import nn

from tersa.errors import ExportError, ModelError, RecipeError
from tersa.export.ct import ct_scheme, inferred_format, not_expressible, tersa_schemes
from tersa.export.format import (
    CT_FORMATS,
    CT_METHOD,
    DENSE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MIXED,
    NATIVE,
    SUPPORTED_VERSIONS,
    TERSA_KEY,
    TERSA_METHOD,
)
from tersa.export.l2 import l2_records
from tersa.export.structured import structured_records
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme

EXTRA_KEYS = ("smoothed", "smoothed_shifts", "biased_norms", "added_biases")


@dataclass
class Group:
    """One compressed-tensors config group and the tersa schemes it stands for."""

    name: str
    scheme: QuantizationScheme
    weights: WeightScheme | None
    activations: ActivationScheme | None

    @property
    def layout(self) -> str:
        return self.scheme.format or inferred_format(self.weights, self.activations)


@dataclass
class ExportPlan:
    """What a ``quantization_config`` says to build, before it is matched against a model.

    ``native``: ``{name: record}`` of layers stored in tersa's layout; ``smooth``: ``{name: kind}``
    of quantized layers with an input transform; ``extras``: the lists of :data:`EXTRA_KEYS`;
    ``structured``: ``{name: record}`` of structured layers (:mod:`tersa.export.structured`);
    ``l2``: ``{name: record}`` of L2 layers (:mod:`tersa.export.l2`); ``kv_policy``: the KV
    policy loading puts on the model (:mod:`tersa.kv.policies`), None for dense.
    """

    quant_method: str
    groups: list[Group] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    native: dict[str, dict[str, Any]] = field(default_factory=dict)
    smooth: dict[str, str] = field(default_factory=dict)
    extras: dict[str, list[str]] = field(default_factory=dict)
    structured: dict[str, Any] = field(default_factory=dict)
    l2: dict[str, Any] = field(default_factory=dict)
    kv_policy: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------- writing


def build_quantization_config(
    model: nn.Module, reference: nn.Module, extras: dict[str, list[str]]
) -> dict[str, Any] | None:
    """``quantization_config`` for ``model``; None when nothing is quantized or changed.

    :param reference: the unmodified architecture (meta device is fine) with the model's structured
        layers placed, to tell which layers were ``nn.Linear`` and which biases are new.
    :param extras: the structural changes (:data:`EXTRA_KEYS`), see ``structural_extras``.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    extras = {k: v for k, v in extras.items() if v}
    structured = structured_records(model)
    l2 = l2_records(model)
    kv = kv_policy_record(model)
    if not layers and not extras and not structured and not l2 and kv is None:
        return None
    by_scheme: dict[str, list[str]] = {}
    native: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        if not_expressible(layer, reference.get_submodule(name)):
            native[name] = _native_record(layer)
        else:
            by_scheme.setdefault(_scheme_key(layer), []).append(name)
    groups = {
        f"group_{i}": ct_scheme(names, layers[names[0]].weights, layers[names[0]].activations)
        for i, names in enumerate(by_scheme.values())
    }
    formats = {g.format for g in groups.values()}
    ct = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else (MIXED if formats else DENSE),
        quantization_status="compressed",
        ignore=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)],
    )
    smooth = {n: m.smooth for n, m in layers.items() if m.smooth is not None}
    tersa: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    parts = (("layers", native), ("smooth", smooth), ("structured", structured), ("l2", l2))
    tersa.update({k: v for k, v in parts if v})
    tersa.update(extras)
    if kv is not None:
        tersa["kv_policy"] = kv
    tersa_only = bool(native or smooth or extras or structured or l2 or kv)
    # A loader that knows compressed-tensors but not tersa would drop what only tersa knows and
    # build another model; quant_method "tersa" keeps it from using this config at all.
    qc = {"quant_method": TERSA_METHOD if tersa_only else CT_METHOD}
    qc.update(ct.model_dump(mode="json", exclude={"quant_method"}))
    qc[TERSA_KEY] = tersa
    return qc


def kv_policy_record(model: nn.Module) -> dict[str, Any] | None:
    """The KV policy set on ``model`` as ``{"name", **options}``; None when dense or unsupported."""
    from tersa.kv.policies import current_policy  # tersa.kv imports the RAT+ model: lazily

    try:
        policy = current_policy(model)
    except ModelError:  # an architecture without decoder attention layers cannot carry one
        return None
    return None if policy.is_dense else policy.to_dict()


def layer_layouts(qc: dict[str, Any]) -> dict[str, str]:
    """``{layer name: layout}`` of a config written by :func:`build_quantization_config` (whose
    targets are exact layer names)."""
    layouts = {n: NATIVE for n in qc[TERSA_KEY].get("layers", {})}
    for group in qc["config_groups"].values():
        layouts.update({name: group["format"] for name in group["targets"]})
    return layouts


def _scheme_key(layer: QuantLinear) -> str:
    d = layer.scheme_dict()
    return json.dumps({"weights": d["weights"], "activations": d["activations"]}, sort_keys=True)


def _native_record(layer: QuantLinear) -> dict[str, Any]:
    d = layer.scheme_dict()
    d.pop("smooth", None)  # listed under tersa.smooth like every other layer's
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        **d,
    }


# ---------------------------------------------------------------------------------------- reading


def read_plan(qc: Any, where: str) -> ExportPlan:
    """Validate a ``quantization_config`` (``where`` names the folder in messages)."""
    if not isinstance(qc, dict) or qc.get("quant_method") not in (TERSA_METHOD, CT_METHOD):
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ExportError(
            f"'{where}' uses quant_method '{method}', not a tersa export; "
            "load it with transformers or the tool that wrote it"
        )
    tersa = _tersa_section(qc, where)
    plan = ExportPlan(quant_method=qc["quant_method"])
    ct = _ct_config(qc, where)
    plan.ignore = list(ct.ignore or [])
    for name, scheme in ct.config_groups.items():
        try:
            weights, activations = tersa_schemes(scheme)
        except (ValueError, ValidationError) as e:
            raise ExportError(f"'{where}': config group '{name}' is not supported: {e}") from None
        plan.groups.append(Group(name, scheme, weights, activations))
    _read_tersa_section(plan, tersa, where)
    if plan.quant_method == CT_METHOD and (
        plan.native or plan.smooth or plan.extras or plan.structured or plan.l2 or plan.kv_policy
    ):
        raise ExportError(
            f"'{where}' has tersa-only parts but quant_method '{CT_METHOD}', so other loaders "
            "would build a different model; re-export it with tersa"
        )
    return plan


def _tersa_section(qc: dict[str, Any], where: str) -> dict[str, Any]:
    section = qc.get(TERSA_KEY)
    if section is None:
        if qc["quant_method"] == CT_METHOD:  # compressed-tensors export from another tool
            return {}
        version = qc.get("version")
        raise ExportError(
            f"'{where}' has tersa format version {version!r}, which this tersa no longer reads "
            f"(it reads {_versions()}); re-export the model"
        )
    if not isinstance(section, dict) or section.get("format") != FORMAT_NAME:
        name = section.get("format") if isinstance(section, dict) else section
        raise ExportError(
            f"'{where}' has export format {name!r}, not '{FORMAT_NAME}'; "
            "load it with the tool that wrote it"
        )
    version = section.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ExportError(
            f"'{where}' has tersa format version {version!r}; this tersa reads versions "
            f"{_versions()} — upgrade tersa or re-export"
        )
    return section


def _versions() -> str:
    return ", ".join(map(str, SUPPORTED_VERSIONS))


def _ct_config(qc: dict[str, Any], where: str) -> QuantizationConfig:
    fields = {k: v for k, v in qc.items() if k not in (TERSA_KEY, "quant_method")}
    fmt = fields.get("format", DENSE)
    if fmt not in (*CT_FORMATS, MIXED):
        raise ExportError(
            f"'{where}' stores weights in format '{fmt}', which tersa does not read "
            f"(it reads {', '.join(CT_FORMATS)}); load it with transformers"
        )
    try:
        ct = QuantizationConfig.model_validate(fields)
    except (ValidationError, ValueError, NotImplementedError) as e:
        raise ExportError(f"'{where}': quantization_config is invalid: {e}") from None
    if ct.kv_cache_scheme is not None:
        raise ExportError(f"'{where}': kv_cache_scheme is not supported by tersa's loader")
    return ct


def _read_tersa_section(plan: ExportPlan, section: dict[str, Any], where: str) -> None:
    layers, smooth = section.get("layers", {}), section.get("smooth", {})
    structured, l2 = section.get("structured", {}), section.get("l2", {})
    extras = {k: section.get(k, []) for k in EXTRA_KEYS}
    ok = (
        isinstance(layers, dict)
        and all(isinstance(v, dict) for v in layers.values())
        and isinstance(structured, dict)
        and isinstance(l2, dict)
        and isinstance(smooth, dict)
        and all(v in ("scale", "scale_shift") for v in smooth.values())
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in extras.values())
    )
    if not ok:
        raise ExportError(f"'{where}': quantization_config.tersa is malformed; re-export the model")
    plan.native, plan.smooth, plan.structured, plan.l2 = layers, smooth, structured, l2
    plan.extras = {k: v for k, v in extras.items() if v}
    kv = section.get("kv_policy")
    if kv is not None:
        from tersa.kv.policies import make_policy

        try:
            plan.kv_policy = make_policy(kv).to_dict()
        except RecipeError as e:
            raise ExportError(
                f"'{where}': quantization_config.tersa.kv_policy is invalid: {e}; re-export it"
            ) from None
