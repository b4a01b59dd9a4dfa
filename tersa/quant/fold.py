"""Exact model transforms: migrate a per-channel shift and scale between a producer and consumers.

A norm → linears group computes ``W·X + b`` with ``X = γ ⊙ x̂ + β``. For per-channel ``s > 0`` and
``z``, ``X = s ⊙ X̃ + z`` with ``X̃ = (X − z)/s``, so ``W·X + b = (W·diag(s))·X̃ + (b + W·z)``:
the norm then emits ``X̃`` (``γ ← γ/s``, ``β ← (β − z)/s``) and every consumer takes
``W ← W·diag(s)``, ``b ← b + W·z``. Quantizers see the milder ``X̃``; in full precision the model
is unchanged up to rounding.

A scale pair (producer linear → consumer linear, e.g. v_proj → o_proj, up_proj → down_proj) is the
scale-only case: the producer's output channel ``j`` is divided by ``s_j`` (rows of W and bias) and
the consumer's input column ``j`` multiplied by it. Under grouped-query attention o_proj's inputs
are the v heads repeated ``n_rep`` times, so the scale is repeated to match.

These functions change modules in place, in float64 arithmetic rounded once to the module dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from tersa.errors import ModelError
from tersa.quant.norms import BiasedRMSNorm, has_bias, is_rms_norm
from tersa.quant.replace import is_linear, linear_weight, replace_linear
from tersa.quant.smoothed import SmoothedLinear


def linear_in_features(linear: nn.Module) -> int:
    return linear_weight(linear).shape[1]


def check_group(norm: nn.Module, linears: dict[str, nn.Module], where: str) -> int:
    """The channel count of a norm → linears group; :class:`ModelError` when shapes disagree."""
    channels = norm.weight.shape[0]
    for name, linear in linears.items():
        if linear_in_features(linear) != channels:
            raise ModelError(
                f"{where}: '{name}' takes {linear_in_features(linear)} inputs but the norm "
                f"before it has {channels} channels; the architecture adapter does not match "
                "this model"
            )
    return channels


@torch.no_grad()
def fold_into_linear_inputs(
    linear: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None = None
) -> None:
    """``W ← W·diag(s)``, ``b ← b + W·z`` (W before scaling); adds a bias if ``z`` needs one.

    :param scale: ``[in]`` positive per-input-channel scale, or None.
    :param shift: ``[in]`` per-input-channel shift, or None.
    """
    w = linear_weight(linear)  # [out, in]; a view for Conv1D, so writes reach the module
    w64 = w.double()
    if shift is not None:
        delta = w64 @ shift.to(w.device, torch.float64)  # [out]
        if linear.bias is None:
            add_linear_bias(linear)
        linear.bias.copy_((linear.bias.double() + delta).to(linear.bias.dtype))
    if scale is not None:
        w.copy_((w64 * scale.to(w.device, torch.float64)[None, :]).to(w.dtype))


@torch.no_grad()
def fold_into_norm(
    norm: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> nn.Module:
    """``γ ← γ/s``, ``β ← (β − z)/s``. Returns the norm, replaced by a :class:`BiasedRMSNorm` when an
    RMSNorm needs a bias for the shift (the caller puts the returned module in place)."""
    if shift is not None and not has_bias(norm):
        if not is_rms_norm(norm):
            raise ModelError(f"cannot shift the output of a {type(norm).__name__} without a bias")
        norm = BiasedRMSNorm.from_norm(norm)
    s = scale.double() if scale is not None else torch.ones_like(norm.weight, dtype=torch.float64)
    norm.weight.copy_((norm.weight.double() / s).to(norm.weight.dtype))
    if has_bias(norm):
        z = shift.double() if shift is not None else 0.0
        norm.bias.copy_(((norm.bias.double() - z) / s).to(norm.bias.dtype))
    return norm


def fold_norm_group(
    block: nn.Module,
    norm_name: str,
    linear_names: tuple[str, ...] | list[str],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
) -> None:
    """Migrate ``(X − z)/s`` through the group ``block.norm_name → block.linear_names``."""
    norm = block.get_submodule(norm_name)
    linears = {name: block.get_submodule(name) for name in linear_names}
    check_group(norm, linears, norm_name)
    for linear in linears.values():
        fold_into_linear_inputs(linear, scale, shift)
    new_norm = fold_into_norm(norm, scale, shift)
    if new_norm is not norm:
        parent, _, leaf = norm_name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, leaf, new_norm)


@torch.no_grad()
def fold_scale_pair(
    producer: nn.Module,
    consumer: nn.Module,
    scale: torch.Tensor,
    head_dim: int | None = None,
    n_rep: int = 1,
) -> None:
    """Divide the producer's output channels by ``s`` ``[out_p]``; multiply the consumer's
    matching input columns by it (each kv head's ``head_dim`` slice ``n_rep`` times under GQA)."""
    w_p = linear_weight(producer)  # [out_p, in_p]
    s = scale.double()
    w_p.copy_((w_p.double() / s[:, None]).to(w_p.dtype))
    if producer.bias is not None:
        producer.bias.copy_((producer.bias.double() / s).to(producer.bias.dtype))
    fold_into_linear_inputs(consumer, expand_for_heads(scale, head_dim, n_rep))


def expand_for_heads(scale: torch.Tensor, head_dim: int | None, n_rep: int) -> torch.Tensor:
    """``[kv_heads·head_dim]`` → ``[kv_heads·n_rep·head_dim]``, head ``h`` reading kv head
    ``h // n_rep`` (transformers' ``repeat_kv``)."""
    if n_rep == 1:
        return scale
    assert head_dim is not None, "grouped-query attention needs head_dim to expand the scale"
    return scale.view(-1, head_dim).repeat_interleave(n_rep, dim=0).reshape(-1)


@torch.no_grad()
def add_linear_bias(linear: nn.Module) -> None:
    """Give a bias-free linear a zero bias (OS+ shifting on Llama-family models)."""
    out = linear_weight(linear).shape[0]
    w = linear.weight
    linear.bias = nn.Parameter(
        torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=False
    )


def migrate_group(
    block: nn.Module,
    norm_name: str,
    linear_names: tuple[str, ...] | list[str],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    pre_norm: bool,
    norm: nn.Module | None = None,
) -> None:
    """Make the group's linears see ``(X − z)/s`` while the model stays exact.

    Pre-norm blocks (the norm output feeds only these linears) fold into the norm
    (:func:`fold_norm_group`). In post-norm blocks (BERT, OPT-350m) the norm output also feeds the
    residual, so the norm stays as it is and the transform sits on the linears' inputs
    (:func:`smooth_group_inputs`).

    :param scale: ``[C]`` positive per-channel scale, or None.
    :param shift: ``[C]`` per-channel shift, or None.
    :param norm: the producing norm when it is not ``block.<norm_name>`` (a block-input group,
        :attr:`tersa.models.layout.NormGroup.block_input`: the norm ends the previous block or the
        embeddings); ``norm_name`` then only labels messages. Its output is the residual stream,
        so such a group is post-norm only.
    """
    for name in linear_names:
        linear = block.get_submodule(name)
        if not is_linear(linear):
            raise ModelError(
                f"{norm_name}: '{name}' is a {type(linear).__name__}, not a float linear; "
                "outlier transforms must run before 'quantize'"
            )
    if pre_norm and norm is not None:
        raise ModelError(
            f"{norm_name}: the group's linears read the block input (the residual stream), so "
            "nothing can fold into its norm; only a post-norm layout can migrate it"
        )
    if pre_norm:
        fold_norm_group(block, norm_name, linear_names, scale, shift)
    else:
        smooth_group_inputs(block, norm_name, linear_names, scale, shift, norm)


def smooth_group_inputs(
    block: nn.Module,
    norm_name: str,
    linear_names: tuple[str, ...] | list[str],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
    norm: nn.Module | None = None,
) -> None:
    """Post-norm migration: every linear of the group becomes a :class:`SmoothedLinear` computing
    ``(W·diag(s))·((X − z)/s) + (b + W·z)``; the norm and the residual keep ``X``. ``norm`` is the
    producing norm when it is outside ``block`` (see :func:`migrate_group`); only its width is
    read.

    ``s`` and ``z`` are relative to what the linears already see: on a layer that smooths already
    (a second transform) they compose, ``((X − z₁)/s₁ − z)/s``. Statistics for ``s`` and ``z``
    therefore come from :func:`tersa.quant.smoothed.effective_input`, not the raw ``X``.
    """
    norm = block.get_submodule(norm_name) if norm is None else norm
    linears = {name: block.get_submodule(name) for name in linear_names}
    check_group(norm, linears, norm_name)
    for name, linear in linears.items():
        if not isinstance(linear, SmoothedLinear):
            linear = SmoothedLinear.from_linear(linear, shift=shift is not None)
            replace_linear(block, name, linear)
        fold_into_linear_inputs(linear, scale, shift)
        linear.compose(scale, shift)
