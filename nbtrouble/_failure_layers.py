"""Failure rules for layers: linear, convolution, pooling, norms, embedding, attention, RNNs.

Each rule takes a ``Context`` and returns a ``Finding`` or ``None``; it reads the layer's own
sizes from its weights (so the functional form works too) and names the layer when one runs.
"""

from __future__ import annotations

import math

import torch

from nbtrouble._failure_context import Context, broadcastable, dtype_text, shape_text
from nbtrouble.findings import Finding

CONV_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}
RNN_OPS = {"lstm", "gru", "rnn_tanh", "rnn_relu"}
_POOL_OPS = {f"{kind}_pool{n}d" for kind in ("max", "avg", "lp") for n in (1, 2, 3)} | {
    f"max_pool{n}d_with_indices" for n in (1, 2, 3)
}


def spatial_names(spatial: int) -> str:
    return {1: "L", 2: "H, W", 3: "D, H, W"}.get(spatial, "...")


def channels_last_permute(ndim: int) -> str:
    """``x.permute(0, 3, 1, 2)``: moves the last dim to dim 1 for an ``ndim``-D tensor."""
    if ndim == 3:
        return "x.transpose(1, 2)"
    order = ", ".join(str(d) for d in (0, ndim - 1, *range(1, ndim - 1)))
    return f"x.permute({order})"


# --- linear ---------------------------------------------------------------------------------


def linear_rule(ctx: Context) -> Finding | None:
    if ctx.op != "linear":
        return None
    x, w = ctx.operand("input"), ctx.operand("weight")
    if x is None or w is None or x.dim() == 0:
        return None
    got, expected = x.shape[-1], w.shape[-1]
    if got == expected:
        return None
    who = (
        f"{ctx.layer} expects in_features={expected}"
        if ctx.layer
        else f"linear with weight {shape_text(w)} expects {expected} input features"
    )
    return ctx.finding(
        "shape_mismatch",
        f"{who} but got input {shape_text(x)} with {got} features in its last dim "
        f"(input {shape_text(x)} x weight {shape_text(w)}^T)",
        _linear_hint(x, w),
    )


def _linear_hint(x: torch.Tensor, w: torch.Tensor) -> str:
    got, expected = x.shape[-1], w.shape[-1]
    out = w.shape[0] if w.dim() == 2 else 1
    shape = tuple(x.shape)
    if x.dim() > 2 and math.prod(shape[1:]) == expected:
        return (
            f"The input is not flattened: its dims after the batch dim hold {expected} values, "
            "as many as in_features. Flatten it first: torch.flatten(x, 1), or an "
            "nn.Flatten() before this layer in an nn.Sequential."
        )
    if x.dim() == 1:
        return (
            f"A 1-D input {shape} is read as one sample with {got} features. A batch of "
            f"{got} samples needs shape ({got}, {expected}): check for a squeeze() that "
            f"dropped the feature dim, or add it back with x.unsqueeze(-1)."
        )
    if expected in shape[:-1]:
        dim = shape.index(expected)
        return (
            f"The {expected} features sit in dim {dim} of {shape}, not in the last dim: "
            f"move them last, e.g. x.transpose({dim}, -1)."
        )
    return (
        f"Build the layer as nn.Linear({got}, {out}), or fix the layer before it so that it "
        f"outputs {expected} features (after a flatten, in_features is the product of all "
        "dims but the batch dim)."
    )


# --- convolution and pooling -----------------------------------------------------------------


def conv_rule(ctx: Context) -> Finding | None:
    if ctx.op not in CONV_OPS:
        return None
    x, w = ctx.operand("input"), ctx.operand("weight")
    if x is None or w is None:
        return None
    spatial = int(ctx.op[-2])
    who = ctx.layer or ctx.op
    if w.dim() != spatial + 2:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.op} needs a {spatial + 2}D weight (out_channels, in_channels / groups, "
            f"{spatial_names(spatial)}) but got weight {shape_text(w)}",
            f"Give the kernel all {spatial + 2} dims, or use the conv{w.dim() - 2}d that fits it.",
        )
    if x.dim() not in (spatial + 1, spatial + 2):
        return ctx.finding(
            "shape_mismatch",
            f"{who} expects a {spatial + 2}D input (N, C, {spatial_names(spatial)}) but got "
            f"{shape_text(x)} ({x.dim()}D)",
            "Give the batch the layout (batch, channels, ...spatial): add a channel dim with "
            "x.unsqueeze(1), or undo a flatten before this layer.",
        )
    transposed = ctx.op.startswith("conv_transpose")
    expected = w.shape[0] if transposed else w.shape[1] * _groups(ctx)
    channels = x.shape[-spatial - 1]
    if channels != expected:
        return ctx.finding(
            "shape_mismatch",
            f"{who} expects in_channels={expected} but got input {shape_text(x)} with "
            f"{channels} channels (dim {x.dim() - spatial - 1}); weight is {shape_text(w)}",
            _channels_hint(x, spatial, channels, expected),
        )
    kernel = tuple(w.shape[2:])
    size = tuple(x.shape[-spatial:])
    if not transposed and any(s < k for s, k in zip(size, kernel)):
        return ctx.finding(
            "shape_mismatch",
            f"{who} has kernel {kernel} but its input {shape_text(x)} is only {size} in space "
            "(before padding)",
            "The input shrank too much before this layer: use fewer poolings/strides, padding, "
            "or a bigger input.",
        )
    return None


def _channels_hint(x: torch.Tensor, spatial: int, channels: int, expected: int) -> str:
    if x.dim() == spatial + 1 and expected == 1:
        return (
            f"{shape_text(x)} looks like a batch without its channel dim (read as "
            f"{channels} channels): add it with x.unsqueeze(1)."
        )
    if x.shape[-1] == expected:
        return (
            f"The input looks channels-last {shape_text(x)}: this layer takes "
            f"(N, C, {spatial_names(spatial)}); move the channels to dim 1 with "
            f"{channels_last_permute(x.dim())}."
        )
    return f"Build the layer with in_channels={channels}, or fix the layer before it."


def _groups(ctx: Context) -> int:
    groups = ctx.argument(6, "groups")
    return groups if isinstance(groups, int) and groups > 0 else 1


def pool_rule(ctx: Context) -> Finding | None:
    """A pooling window bigger than what is left of the input."""
    if ctx.op not in _POOL_OPS:
        return None
    x = ctx.operand("input")
    spatial = int(ctx.op.split("pool", 1)[1][0])
    if x is None or x.dim() not in (spatial + 1, spatial + 2):
        return None if x is None else _wrong_rank(ctx, x, spatial)
    first = 2 if ctx.op.startswith("lp") else 1
    kernel = _tuple(ctx.argument(first, "kernel_size"), spatial)
    stride = _tuple(ctx.argument(first + 1, "stride") or kernel, spatial)
    padding = _tuple(0 if first == 2 else ctx.argument(3, "padding", 0), spatial)
    if kernel is None or stride is None or padding is None:
        return None
    size = tuple(x.shape[-spatial:])
    out = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, kernel, stride, padding))
    if all(o > 0 for o in out):
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} has kernel {kernel} (stride {stride}) but its input {shape_text(x)} is "
        f"only {size} in space: the output would be {out}",
        "The input shrank too much before this layer: use fewer poolings/strides, padding, "
        "or a bigger input.",
    )


def _wrong_rank(ctx: Context, x: torch.Tensor, spatial: int) -> Finding:
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} expects a {spatial + 2}D input (N, C, {spatial_names(spatial)}) but "
        f"got {shape_text(x)} ({x.dim()}D)",
        "Give the batch the layout (batch, channels, ...spatial); undo a flatten or add the "
        "channel dim with x.unsqueeze(1).",
    )


def _tuple(value: object, n: int) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return (value,) * n
    if (
        isinstance(value, (tuple, list))
        and len(value) == n
        and all(isinstance(v, int) for v in value)
    ):
        return tuple(value)
    return None


def interpolate_rule(ctx: Context) -> Finding | None:
    if ctx.op not in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"):
        return None
    x = ctx.operand("input")
    if x is None:
        return None
    if x.dim() < 3:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} resizes (N, C, ...spatial) batches but got {shape_text(x)} "
            f"({x.dim()}D): the first two dims are never resized",
            f"Add the batch and channel dims first, e.g. x[None, None] for one {x.dim()}-D "
            "image, and take them off after.",
        )
    spatial = x.dim() - 2
    for name, index in (("size", 1), ("scale_factor", 2)):
        value = ctx.argument(index, name)
        if isinstance(value, (tuple, list)) and len(value) != spatial:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.subject()} got {name}={tuple(value)} with {len(value)} entries, but input "
                f"{shape_text(x)} has {spatial} spatial dims {tuple(x.shape[2:])}",
                f"Give one {name} entry per spatial dim (the dims after N and C).",
            )
    return None


# --- norms and embedding ---------------------------------------------------------------------


def norm_rule(ctx: Context) -> Finding | None:
    x = ctx.operand("input")
    if x is None:
        return None
    if ctx.op == "layer_norm":
        return _layer_norm_finding(ctx, x)
    if ctx.op == "group_norm":
        return _group_norm_finding(ctx, x)
    if ctx.op in ("batch_norm", "instance_norm") and x.dim() >= 2:
        w = ctx.operand("weight", "running_mean")
        if w is not None and w.shape[0] != x.shape[1]:
            return ctx.finding(
                "shape_mismatch",
                f"{ctx.subject()} has num_features={w.shape[0]} but got input {shape_text(x)} "
                f"with {x.shape[1]} channels in dim 1",
                _norm_hint(x, w.shape[0]),
            )
    return None


def _layer_norm_finding(ctx: Context, x: torch.Tensor) -> Finding | None:
    shape = ctx.argument(1, "normalized_shape")
    shape = tuple(shape) if shape is not None else ()
    last = tuple(x.shape[-len(shape) :]) if shape else ()
    if not shape or last == shape:
        return None
    hint = f"Build the norm with normalized_shape={last} or fix the layer before it."
    if len(shape) == 1 and shape[0] in tuple(x.shape[:-1]):
        dim = tuple(x.shape).index(shape[0])
        hint = (
            f"The {shape[0]} features sit in dim {dim} of {shape_text(x)}, but LayerNorm "
            f"normalizes the last dims: move them last (x.movedim({dim}, -1)), or for "
            "(N, C, H, W) maps use nn.GroupNorm(1, C) or a BatchNorm."
        )
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} normalizes the last dims {shape} but got input {shape_text(x)}",
        hint,
    )


def _group_norm_finding(ctx: Context, x: torch.Tensor) -> Finding | None:
    groups = ctx.argument(1, "num_groups")
    w = ctx.operand("weight")
    if x.dim() < 2 or not isinstance(groups, int) or groups < 1:
        return None
    channels = x.shape[1]
    if w is not None and w.shape[0] != channels:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} has num_channels={w.shape[0]} but got input {shape_text(x)} with "
            f"{channels} channels in dim 1",
            f"Build the norm with num_channels={channels}, or fix the layer before it.",
        )
    if channels % groups:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} splits {channels} channels of input {shape_text(x)} into "
            f"num_groups={groups}, which does not divide them",
            "Pick num_groups that divides the channel count (e.g. a power of 2 for 2**k channels).",
        )
    return None


def _norm_hint(x: torch.Tensor, features: int) -> str:
    if x.dim() > 2 and x.shape[-1] == features:
        return (
            f"The input looks channels-last {shape_text(x)}: batch norm takes the features in "
            f"dim 1, (N, C) or (N, C, L...); move them with {channels_last_permute(x.dim())} "
            "(and back after), or use nn.LayerNorm, which normalizes the last dim."
        )
    return f"Build the norm with num_features={x.shape[1]} (the channels of the layer before it)."


def embedding_rule(ctx: Context) -> Finding | None:
    if ctx.op != "embedding":
        return None
    indices, table = ctx.operand("input"), ctx.operand("weight")
    if indices is None or table is None:
        return None
    who = ctx.layer or "embedding"
    if indices.is_floating_point() or indices.dtype == torch.bool:
        return ctx.finding(
            "dtype_mismatch",
            f"{who} needs integer indices (int64) but got {dtype_text(indices)} input "
            f"{shape_text(indices)}",
            "Pass token ids as integers (x.long()); float features go to nn.Linear, "
            "not nn.Embedding.",
        )
    num = table.shape[0]
    if indices.device.type == "meta" or indices.numel() == 0:
        return None
    low, high = int(indices.min()), int(indices.max())
    if high < num and low >= 0:
        return None
    bad = high if high >= num else low
    return ctx.finding(
        "shape_mismatch",
        f"{who} has num_embeddings={num} (valid indices 0..{num - 1}) but input "
        f"{shape_text(indices)} contains index {bad}",
        f"Build the embedding with num_embeddings at least {max(high + 1, num)} (the vocabulary "
        "size, max index + 1), or fix the ids/vocabulary that produced the index.",
    )


# --- attention -------------------------------------------------------------------------------


def attention_rule(ctx: Context) -> Finding | None:
    """``multi_head_attention_forward``: embed_dim, then the masks against (L, N, S)."""
    if ctx.op != "multi_head_attention_forward":
        return None
    query, key = ctx.operand("query"), ctx.operand("key")
    expected = ctx.argument(3, "embed_dim_to_check")
    if query is None or key is None or not isinstance(expected, int):
        return None
    batch_first = bool(getattr(ctx.module, "batch_first", False))
    if query.shape[-1] != expected:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} expects embed_dim={expected} but got query "
            f"{_user_layout(query, batch_first)} with {query.shape[-1]} features in its last dim",
            f"Build the attention with embed_dim={query.shape[-1]}, or project the inputs to "
            f"{expected} features first.",
        )
    if query.dim() != 3 or key.dim() != 3:
        return None
    return _mask_finding(ctx, query, key, batch_first)


def sdpa_rule(ctx: Context) -> Finding | None:
    """``scaled_dot_product_attention``: q (..., L, E), k (..., S, E), v (..., S, Ev)."""
    if ctx.op != "scaled_dot_product_attention":
        return None
    q, k, v = ctx.operand("query"), ctx.operand("key"), ctx.operand("value")
    if q is None or k is None or v is None or min(q.dim(), k.dim(), v.dim()) < 2:
        return None
    shapes = f"query {shape_text(q)}, key {shape_text(k)}, value {shape_text(v)}"
    if q.shape[-1] != k.shape[-1]:
        return ctx.finding(
            "shape_mismatch",
            f"scaled_dot_product_attention needs query and key with the same last dim (the "
            f"head dim) but got {shapes}",
            "Project query and key to the same head dim; check the head split "
            "(view(N, L, heads, head_dim).transpose(1, 2)) of each.",
        )
    if k.shape[-2] != v.shape[-2]:
        return ctx.finding(
            "shape_mismatch",
            f"scaled_dot_product_attention needs key and value of the same length (dim -2) "
            f"but got {shapes}",
            "Key and value must come from the same source sequence.",
        )
    mask = ctx.operand("attn_mask")
    scores = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
    if mask is not None and not broadcastable(tuple(mask.shape), scores):
        return ctx.finding(
            "shape_mismatch",
            f"scaled_dot_product_attention needs attn_mask broadcastable to the scores "
            f"{scores} (..., target length, source length) but got {shape_text(mask)}",
            "A (batch, source) padding mask needs two more dims: mask[:, None, None, :].",
        )
    return None


def _user_layout(t: torch.Tensor, batch_first: bool) -> str:
    """A (L, N, E) tensor as the user passed it: (N, L, E) for a batch_first module."""
    shape = tuple(t.shape)
    if batch_first and len(shape) == 3:
        shape = (shape[1], shape[0], shape[2])
    return str(shape)


def _mask_finding(
    ctx: Context, query: torch.Tensor, key: torch.Tensor, batch_first: bool
) -> Finding | None:
    length, batch, source = query.shape[0], query.shape[1], key.shape[0]
    heads = ctx.argument(4, "num_heads")
    sizes = f"batch={batch}, target length={length}, source length={source}"
    padding = ctx.operand("key_padding_mask")
    if padding is not None and tuple(padding.shape) != (batch, source):
        hint = "key_padding_mask marks padded source positions: shape (batch, source length)."
        if (
            tuple(padding.shape) == (source, batch)
            or not batch_first
            and padding.shape[0] == length
        ):
            hint = _batch_first_hint(ctx, batch_first)
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} expects key_padding_mask of shape {(batch, source)} ({sizes}) but "
            f"got {shape_text(padding)}",
            hint,
        )
    mask = ctx.operand("attn_mask")
    wanted = [(length, source)] + (
        [(batch * heads, length, source)] if isinstance(heads, int) else []
    )
    if mask is None or tuple(mask.shape) in wanted:
        return None
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} expects attn_mask of shape {wanted[0]}"
        + (f" or {wanted[1]}" if len(wanted) > 1 else "")
        + f" ({sizes}) but got {shape_text(mask)}",
        _attn_mask_hint(ctx, mask, batch, length, source, batch_first),
    )


def _attn_mask_hint(
    ctx: Context, mask: torch.Tensor, batch: int, length: int, source: int, batch_first: bool
) -> str:
    shape = tuple(mask.shape)
    if shape == (batch, source):
        return (
            "A (batch, seq) mask of padded positions goes in key_padding_mask=, not "
            "attn_mask= (which masks (target, source) pairs, e.g. a causal mask)."
        )
    if mask.dim() == 2 and shape[0] == shape[1]:
        return (
            f"The mask was built for {shape[0]} positions but the sequence has {length}: "
            "build it from the input's length, e.g. "
            f"nn.Transformer.generate_square_subsequent_mask({_seq_len_text(batch_first)})."
        )
    if shape == (source, source) or shape == (batch, batch):
        return _batch_first_hint(ctx, batch_first)
    return "attn_mask masks (target, source) pairs: shape (L, S), or (N * num_heads, L, S)."


def _seq_len_text(batch_first: bool) -> str:
    return "x.size(1)" if batch_first else "x.size(0)"


def _batch_first_hint(ctx: Context, batch_first: bool) -> str:
    layout = "(batch, seq, embed)" if batch_first else "(seq, batch, embed)"
    other = "False" if batch_first else "True"
    return (
        f"The layer has batch_first={batch_first}, so it reads its inputs as {layout}: if "
        f"yours are laid out the other way, build it with batch_first={other} or transpose "
        "the inputs."
    )


# --- recurrent layers ------------------------------------------------------------------------


def recurrent_input_rule(ctx: Context) -> Finding | None:
    """The sequence fed to an RNN layer: its rank and its last dim against input_size."""
    module = ctx.module
    if not isinstance(module, torch.nn.RNNBase):
        return None
    x = ctx.module_inputs.get("input")
    if x is None and ctx.op in RNN_OPS:
        x = ctx.operand("input")
    size = module.input_size
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() not in (2, 3):
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.subject()} expects a 2D or 3D input (seq, batch, features) but got "
            f"{shape_text(x)}",
            "Shape the input as (seq_len, batch, input_size), or (batch, seq_len, "
            "input_size) with batch_first=True.",
        )
    if x.shape[-1] == size:
        return None
    hint = f"Build the layer with input_size={x.shape[-1]}, or fix the features fed to it."
    if size in tuple(x.shape[:-1]):
        hint = (
            f"The features ({size}) sit in another dim of {shape_text(x)}: the input must be "
            "(seq_len, batch, input_size), or (batch, seq_len, input_size) with "
            "batch_first=True; permute it."
        )
    return ctx.finding(
        "shape_mismatch",
        f"{ctx.subject()} expects input_size={size} but got input {shape_text(x)} with "
        f"{x.shape[-1]} features in its last dim",
        hint,
    )


def recurrent_state_rule(ctx: Context) -> Finding | None:
    """The initial state of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``: its form and shape."""
    module = ctx.module
    if not isinstance(module, torch.nn.RNNBase):
        return None
    inputs = ctx.module_inputs
    x = inputs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return None
    is_lstm = isinstance(module, torch.nn.LSTM)
    states = {name: t for name, t in inputs.items() if name.startswith("hx")}
    if is_lstm and "hx" in states:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.layer} takes its state as a tuple (h0, c0) but got one tensor hx "
            f"{shape_text(states['hx'])}",
            "Pass both states: lstm(x, (h0, c0)); a single h0 is what GRU and RNN take.",
        )
    if not is_lstm and "hx[0]" in states:
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.layer} takes one state tensor h0 but got a tuple of {len(states)}",
            f"Pass h0 alone: {type(module).__name__.lower()}(x, h0); (h0, c0) is LSTM's form.",
        )
    return _state_shape_finding(ctx, module, x, states, is_lstm)


def _state_shape_finding(
    ctx: Context,
    module: torch.nn.RNNBase,
    x: torch.Tensor,
    states: dict[str, torch.Tensor],
    is_lstm: bool,
) -> Finding | None:
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size or module.hidden_size if is_lstm else module.hidden_size
    batched = x.dim() == 3
    batch = x.shape[0 if module.batch_first else 1] if batched else None
    names = ("hx[0]", "hx[1]") if is_lstm else ("hx",)
    for name, size in zip(names, (out, module.hidden_size)):
        state = states.get(name)
        wanted = (layers, batch, size) if batched else (layers, size)
        if state is None or tuple(state.shape) == wanted:
            continue
        label = {"hx[0]": "h0", "hx[1]": "c0", "hx": "h0"}[name]
        form = (
            "(num_layers * num_directions, batch, hidden_size)"
            if batched
            else ("(num_layers * num_directions, hidden_size)")
        )
        return ctx.finding(
            "shape_mismatch",
            f"{ctx.layer} expects {label} of shape {wanted} = {form} for input {shape_text(x)} "
            f"(batch_first={module.batch_first}) but got {shape_text(state)}",
            _state_hint(module, x, state, wanted, label),
        )
    return None


def _state_hint(
    module: torch.nn.RNNBase,
    x: torch.Tensor,
    state: torch.Tensor,
    wanted: tuple[int | None, ...],
    label: str,
) -> str:
    shape = tuple(state.shape)
    if len(shape) == 3 and (shape[1], shape[0], shape[2]) == wanted:
        return (
            f"The state keeps batch in dim 1 even with batch_first=True: use "
            f"{label}.transpose(0, 1), or build it as torch.zeros{wanted}."
        )
    if len(shape) == len(wanted) == 3 and shape[1] != wanted[1]:
        where = "dim 0" if module.batch_first else "dim 1"
        return (
            f"The state's batch ({shape[1]}) must equal the input's ({wanted[1]}, {where} of "
            f"{shape_text(x)} since batch_first={module.batch_first}): build it from "
            f"x.size({0 if module.batch_first else 1}), and check batch_first."
        )
    return f"Build {label} as torch.zeros{wanted}."


def module_dtype_rule(ctx: Context) -> Finding | None:
    """A layer's own check failed and its input's dtype differs from its weights'."""
    module = ctx.module
    x = ctx.module_inputs.get("input")
    if not isinstance(x, torch.Tensor) or not ctx.layer:
        return None
    weight = next((p for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    if weight is None or not x.is_floating_point() or x.dtype == weight.dtype:
        return None
    return ctx.finding(
        "dtype_mismatch",
        f"input is {dtype_text(x)} but {ctx.layer}'s weights are {dtype_text(weight)}",
        f"Convert the input with x.to({weight.dtype})"
        + (" (numpy arrays arrive as float64)." if x.dtype == torch.float64 else "."),
    )
