"""Failure rules for losses and ``backward``: targets against outputs, gradients against losses."""

from __future__ import annotations

import torch

from nbtrouble._failure_context import Context, dtype_text, shape_text
from nbtrouble.findings import Finding

CLASS_LOSSES = {"cross_entropy", "nll_loss"}
SAME_SHAPE_LOSSES = {
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
}
_FLOAT_TARGET_LOSSES = {"binary_cross_entropy", "binary_cross_entropy_with_logits"}


def class_loss_rule(ctx: Context) -> Finding | None:
    """``cross_entropy`` / ``nll_loss``: the target is class indices of shape (N, d1, ...)."""
    if ctx.op not in CLASS_LOSSES:
        return None
    logits, target = ctx.operand("input"), ctx.operand("target")
    if logits is None or target is None:
        return None
    if target.is_floating_point():
        if target.shape == logits.shape:
            return None
        return ctx.finding(
            "dtype_mismatch",
            f"{ctx.op} got {dtype_text(target)} target {shape_text(target)} for input "
            f"{shape_text(logits)}: class-index targets must be int64 (float targets must "
            "be class probabilities of the input's shape)",
            "Pass class indices as target.long() (one-hot rows: target.argmax(dim=1)); for "
            "regression use mse_loss.",
        )
    if target.dtype != torch.long:
        return ctx.finding(
            "dtype_mismatch",
            f"{ctx.op} got {dtype_text(target)} target {shape_text(target)}: class indices "
            "must be int64",
            "Convert the target with target.long().",
        )
    return _target_shape_finding(ctx, logits, target) or _class_range_finding(ctx, logits, target)


def _expected_target(logits: torch.Tensor) -> tuple[int, ...]:
    """Class-index target shape for logits (C,), (N, C) or (N, C, d1, ...)."""
    if logits.dim() <= 1:
        return ()
    return (logits.shape[0], *logits.shape[2:])


def _target_shape_finding(
    ctx: Context, logits: torch.Tensor, target: torch.Tensor
) -> Finding | None:
    wanted = _expected_target(logits)
    got = tuple(target.shape)
    if got == wanted:
        return None
    if logits.dim() > 1 and target.dim() > 0 and target.shape[0] != logits.shape[0]:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} got input {shape_text(logits)} and target {shape_text(target)}: batch "
            f"sizes {logits.shape[0]} and {target.shape[0]} differ",
            "Input and target must hold the same samples: check the batching of the "
            "targets and any reshape of the model output.",
        )
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} expects class-index target of shape {wanted} for input "
        f"{shape_text(logits)} (classes in dim 1) but got target {shape_text(target)}",
        _target_hint(logits, got, wanted),
    )


def _target_hint(logits: torch.Tensor, got: tuple[int, ...], wanted: tuple[int, ...]) -> str:
    shape = tuple(logits.shape)
    if logits.dim() > 2 and got == shape[:-1]:
        return (
            f"The input looks like (N, ..., C) with the {shape[-1]} classes last: "
            "the loss takes classes in dim 1. Use "
            f"logits.reshape(-1, {shape[-1]}) with target.reshape(-1), or move the classes "
            "with logits.transpose(1, -1)."
        )
    if got == shape:
        return (
            "The target has the input's shape: for one-hot labels pass class indices "
            "(target.argmax(dim=1)), or float class probabilities (target.float())."
        )
    if len(got) == len(wanted) + 1 and 1 in got:
        return f"Drop the extra size-1 dim of the target, e.g. target.squeeze({got.index(1)})."
    return "Give one class index per sample (and per position): shape (N,) or (N, d1, ...)."


def _class_range_finding(
    ctx: Context, logits: torch.Tensor, target: torch.Tensor
) -> Finding | None:
    classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    if target.device.type == "meta" or not target.numel():
        return None
    ignore = ctx.kwargs.get("ignore_index", -100)
    valid = target[target != ignore]
    if not valid.numel():
        return None
    high, low = int(valid.max()), int(valid.min())
    if high < classes and low >= 0:
        return None
    bad = high if high >= classes else low
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.op} got target class {bad} but input {shape_text(logits)} has "
        f"{classes} classes (valid 0..{classes - 1})",
        f"Make the last layer output as many classes as there are labels "
        f"(at least {high + 1}), or fix the labels (class ids start at 0).",
    )


def same_shape_loss_rule(ctx: Context) -> Finding | None:
    if ctx.op not in SAME_SHAPE_LOSSES:
        return None
    x, target = ctx.operand("input"), ctx.operand("target")
    if x is None or target is None:
        return None
    if x.shape != target.shape:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} needs input and target of the same shape but got input {shape_text(x)} "
            f"and target {shape_text(target)}",
            "Reshape the target to the output's shape (target.view_as(output)); "
            "a (N, 1) output against an (N,) target is the usual cause.",
        )
    if ctx.op in _FLOAT_TARGET_LOSSES and not target.is_floating_point():
        return ctx.finding(
            "dtype_mismatch",
            f"{ctx.op} needs a float target (0./1. or probabilities) but got "
            f"{dtype_text(target)} target {shape_text(target)}",
            "Convert the target with target.float().",
        )
    return None


def backward_rule(ctx: Context) -> Finding | None:
    """``loss.backward()``: a scalar loss, or a gradient of the tensor's shape."""
    if ctx.op != "backward":
        return None
    loss = ctx.operand("input", "tensors")
    gradient = ctx.operand("gradient", "grad_tensors")
    if loss is None:
        return None
    if not loss.requires_grad:
        return ctx.finding(
            "no_gradient",
            f"backward() on a tensor {shape_text(loss)} that does not require grad: nothing in "
            "its computation has a trainable parameter attached",
            "Look for what cut the graph: torch.no_grad(), .detach(), .item()/.numpy() and back, "
            "or parameters with requires_grad=False.",
        )
    if gradient is None and loss.numel() != 1:
        return ctx.finding(
            "shape_mismatch",
            f"backward() needs a scalar loss but got a tensor of shape {shape_text(loss)}",
            "Reduce it to one number first: loss.mean() or loss.sum() (reduction='none' keeps "
            "one loss per element), or pass gradient=torch.ones_like(loss).",
        )
    if gradient is not None and gradient.shape != loss.shape:
        return ctx.finding(
            "shape_mismatch",
            f"backward() got gradient {shape_text(gradient)} for a tensor of shape "
            f"{shape_text(loss)}",
            "The gradient must have the tensor's shape, e.g. torch.ones_like(loss).",
        )
    return None
