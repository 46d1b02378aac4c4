"""Per-sample gradients assembled layer by layer from one batched forward and backward pass.

For a layer y = W a + b applied at positions s of sample n (pixels of a convolution, tokens
of an attention projection), with δ = ∂(Σ_m f_m)/∂y the gradient reaching its output,

    ∇_W f_n = Σ_s δ_{n,s} a_{n,s}ᵀ        ∇_b f_n = Σ_s δ_{n,s}

because samples in a batch do not interact (the UNet has no batch statistics), so the part of
δ belonging to sample n is ∂f_n/∂y_n. A convolution's a_{n,s} are the unfolded input patches
(im2col); a group or layer norm y = γ ⊙ x̂ + β gives ∇_γ f_n = Σ_s δ_{n,s} ⊙ x̂_{n,s} and
∇_β f_n = Σ_s δ_{n,s}.

This needs only the input gradients of an ordinary batched backward pass (no weight gradients)
plus one batched matrix product per layer, instead of ``vmap(grad(f))``'s per-sample graph:
the same FLOPs, in large matrix products. Layers are Linear, Conv2d (zero padding), GroupNorm
and LayerNorm; ``layer_plan`` returns None when a selected parameter lives anywhere else, and
callers then fall back to ``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffattr.errors import ConfigError

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
#: What :func:`layer_plan` accepts, for error messages.
SUPPORTED_DESCRIPTION = "a Linear, Conv2d (zero padding), GroupNorm or LayerNorm layer"


@dataclass
class HookedLayer:
    """One layer whose per-sample gradients are assembled: its module and the selected
    parameters it owns ({local name: full name}, local name ``weight`` or ``bias``)."""

    module: nn.Module
    params: dict[str, str]
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return isinstance(module, SUPPORTED_LAYERS)


def layer_plan(model: nn.Module, param_names: list[str]) -> list[HookedLayer] | None:
    """The layers owning ``param_names``, or None if one of them is not a supported layer."""
    wanted = set(param_names)
    plan: list[HookedLayer] = []
    for mod_name, module in model.named_modules():
        own = {
            local: f"{mod_name}.{local}" if mod_name else local
            for local, _ in module.named_parameters(recurse=False)
        }
        own = {local: full for local, full in own.items() if full in wanted}
        if not own:
            continue
        if not _supported(module) or not set(own) <= {"weight", "bias"}:
            return None
        plan.append(HookedLayer(module, own))
        wanted -= set(own.values())
    return plan if not wanted else None


@contextmanager
def recording(plan: list[HookedLayer]):
    """Record every call's input and output on the planned layers while the block runs.

    An output that does not depend on anything requiring grad (e.g. the timestep embedding)
    is replaced by a leaf that does, so gradients still reach it.
    """

    def hook(layer: HookedLayer) -> Callable:
        def fn(module, args, output):
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            layer.inputs.append(args[0].detach())
            layer.outputs.append(output)
            return output

        return fn

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in plan]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in plan:
            layer.inputs.clear()
            layer.outputs.clear()


def flat_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, *, d) → (B, S, d): a Linear layer's input or output gradient, position by position."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def conv_patches(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """(B, C_in·k_h·k_w, L): the convolution's input patch at every output position (im2col;
    a plain reshape for an unstrided, unpadded 1×1 convolution)."""
    m = module
    if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
        return a.reshape(a.shape[0], a.shape[1], -1)
    return F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)


def _channels_last_positions(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) → (B, S, C)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def layer_sample_grads(
    module: nn.Module, a: torch.Tensor, delta: torch.Tensor, which: set[str]
) -> dict[str, torch.Tensor]:
    """Per-sample gradients {``weight``/``bias``: (B, *shape)} of one call of ``module`` with
    input ``a`` and output gradient ``delta`` (formulas in the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    B = a.shape[0]
    if isinstance(module, nn.Linear):
        d = flat_positions(delta)
        if "weight" in which:
            out["weight"] = torch.bmm(d.transpose(1, 2), flat_positions(a))
        if "bias" in which:
            out["bias"] = d.sum(dim=1)
    elif isinstance(module, nn.Conv2d):
        d = delta.reshape(B, delta.shape[1], -1)
        if "weight" in which:
            cols = conv_patches(module, a)
            if module.groups == 1:
                g = torch.bmm(d, cols.transpose(1, 2))
            else:  # block-diagonal: group j's outputs see group j's input channels
                G = module.groups
                d_g = d.reshape(B * G, d.shape[1] // G, -1)
                c_g = cols.reshape(B * G, cols.shape[1] // G, -1)
                g = torch.bmm(d_g, c_g.transpose(1, 2))
            out["weight"] = g.reshape(B, *module.weight.shape)
        if "bias" in which:
            out["bias"] = d.sum(dim=2)
    else:  # GroupNorm / LayerNorm: y = γ ⊙ x̂ + β
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(a, module.num_groups, eps=module.eps)
            d_pos, x_pos = _channels_last_positions(delta), _channels_last_positions(xhat)
        else:
            xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            shape = (B, -1, *module.normalized_shape)
            d_pos, x_pos = delta.reshape(shape), xhat.reshape(shape)
        if "weight" in which:
            out["weight"] = (d_pos * x_pos).sum(dim=1)
        if "bias" in which:
            out["bias"] = d_pos.sum(dim=1)
    return out


def assemble_sample_grads(
    plan: list[HookedLayer], total: torch.Tensor, batch: int, projector=None
) -> dict[str, torch.Tensor]:
    """Backpropagate ``total`` (Σ over the batch of the per-sample measure) to the recorded
    layer outputs and assemble {parameter name: (``batch``, *shape)} per-sample gradients,
    or with ``projector`` (a :class:`~diffattr.attribution.layer_projection.LayerProjector`)
    their per-layer projections {parameter name: (``batch``, d)}.

    Every recorded call must be per sample (leading dimension ``batch``): a layer applied to
    something shared by the batch has no per-sample gradient this way (ConfigError).
    """
    for layer in plan:
        for a, o in zip(layer.inputs, layer.outputs, strict=True):
            if a.dim() < 2 or a.shape[0] != batch or o.shape[0] != batch:
                name = next(iter(layer.params.values())).rpartition(".")[0] or "the model"
                raise ConfigError(
                    f"layer {name} was called on an input of shape {tuple(a.shape)}, not one "
                    f"row per sample of the batch of {batch}",
                    hint="use gradient strategy 'vmap' for this model",
                )
    outputs = [o for layer in plan for o in layer.outputs]
    deltas = torch.autograd.grad(total, outputs, allow_unused=True)
    grads: dict[str, torch.Tensor] = {}
    i = 0
    for index, layer in enumerate(plan):
        which = set(layer.params)
        for a, o in zip(layer.inputs, layer.outputs, strict=True):
            delta = deltas[i]
            i += 1
            if delta is None:
                delta = torch.zeros_like(o)
            if projector is None:
                parts = layer_sample_grads(layer.module, a, delta, which)
            else:
                parts = projector.layer_features(index, layer.module, a, delta, which)
            for local, g in parts.items():
                name = layer.params[local]
                grads[name] = grads[name] + g if name in grads else g
    return grads
