"""tersa's quantization schemes in compressed-tensors terms, and back.

Both tools share one integer convention (signed codes, ``x̂ = (q − z)·s``, int8 zero points), so a
scheme maps field by field: bits → ``num_bits``, granularity → ``strategy`` (``tensor`` /
``channel`` / ``group`` for weights, ``token`` (dynamic) / ``tensor`` (static) for inputs).
"""

from __future__ import annotations

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from torch import nn

from tersa.export.format import DENSE, INT_QUANTIZED, PACK_QUANTIZED
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme

# Activation-ordering values that change only how weights were calibrated, not how they are stored.
_STORAGE_NEUTRAL_ACTORDER = (None, "weight", "static")


def layer_format(weights: WeightScheme | None, activations: ActivationScheme | None) -> str:
    """The compressed-tensors format a layer is stored in.

    8-bit weights with quantized inputs (W8A8) are ``int-quantized`` (int8 ``weight``, what W8A8
    int8 kernels take); other weights are ``pack-quantized``; activation-only layers ``dense``.
    """
    if weights is None:
        return DENSE
    if weights.bits == 8 and activations is not None:
        return INT_QUANTIZED
    return PACK_QUANTIZED


def inferred_format(weights: WeightScheme | None, activations: ActivationScheme | None) -> str:
    """The format compressed-tensors assumes for a group that names none (its own inference:
    quantized inputs make any integer weights ``int-quantized``)."""
    if weights is None:
        return DENSE
    return INT_QUANTIZED if activations is not None else PACK_QUANTIZED


def weight_args(scheme: WeightScheme) -> QuantizationArgs:
    """compressed-tensors arguments for a weight scheme (static, integer)."""
    return QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy=scheme.granularity,
        group_size=scheme.group_size,
        dynamic=False,
    )


def activation_args(scheme: ActivationScheme) -> QuantizationArgs:
    """compressed-tensors arguments for an input scheme: ``token`` is dynamic, ``tensor`` static."""
    return QuantizationArgs(
        num_bits=scheme.bits,
        type="int",
        symmetric=scheme.symmetric,
        strategy=scheme.granularity,
        dynamic=scheme.granularity == "token",
    )


def ct_scheme(
    targets: list[str], weights: WeightScheme | None, activations: ActivationScheme | None
) -> QuantizationScheme:
    """The config group for layers ``targets`` that share one tersa scheme."""
    return QuantizationScheme(
        targets=targets,
        weights=weight_args(weights) if weights else None,
        input_activations=activation_args(activations) if activations else None,
        format=layer_format(weights, activations),
    )


def not_expressible(layer: QuantLinear, original: nn.Module) -> str | None:
    """Why compressed-tensors cannot describe ``layer`` (which replaced ``original``), or None.

    compressed-tensors quantizes ``nn.Linear`` weights ``[out, in]`` in equal groups; tersa also
    quantizes transformers ``Conv1D`` (weight ``[in, out]``) and lets the last group be shorter.
    """
    if not isinstance(original, nn.Linear):
        return f"it replaces a {type(original).__name__}, not an nn.Linear"
    w = layer.weights
    if w is not None and w.group_size is not None and layer.in_features % w.group_size:
        return f"group size {w.group_size} does not divide in_features {layer.in_features}"
    return None


def tersa_schemes(
    scheme: QuantizationScheme,
) -> tuple[WeightScheme | None, ActivationScheme | None]:
    """The tersa schemes of a compressed-tensors group; ``ValueError`` naming what tersa lacks."""
    if scheme.output_activations is not None:
        raise ValueError("output activation quantization is not supported")
    weights = _weight_scheme(scheme.weights) if scheme.weights else None
    activations = _activation_scheme(scheme.input_activations)
    if weights is None and activations is None:
        raise ValueError("the group quantizes neither weights nor input activations")
    fmt = scheme.format or inferred_format(weights, activations)
    if fmt not in (PACK_QUANTIZED, INT_QUANTIZED, DENSE) or (fmt == DENSE) != (weights is None):
        raise ValueError(f"format '{fmt}' does not fit this scheme")
    return weights, activations


def _weight_scheme(args: QuantizationArgs) -> WeightScheme:
    if args.type != "int" or args.dynamic is not False or args.block_structure is not None:
        raise ValueError(f"weights must be static integers, got {_describe(args)}")
    if args.actorder not in _STORAGE_NEUTRAL_ACTORDER:
        raise ValueError(f"actorder '{args.actorder}' (a g_idx permutation) is not supported")
    if args.strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"weight strategy '{args.strategy}' is not supported")
    group = args.group_size if args.strategy == "group" else None
    return WeightScheme(
        bits=args.num_bits, granularity=args.strategy, group_size=group, symmetric=args.symmetric
    )


def _activation_scheme(args: QuantizationArgs | None) -> ActivationScheme | None:
    if args is None:
        return None
    dynamic_token = args.strategy == "token" and args.dynamic is True
    static_tensor = args.strategy == "tensor" and args.dynamic is False
    if args.type != "int" or not (dynamic_token or static_tensor):
        raise ValueError(
            "input activations must be dynamic per-token or static per-tensor integers, got "
            + _describe(args)
        )
    return ActivationScheme(bits=args.num_bits, granularity=args.strategy, symmetric=args.symmetric)


def _describe(args: QuantizationArgs) -> str:
    return f"{args.type} {args.num_bits}-bit {args.strategy} (dynamic={args.dynamic})"
