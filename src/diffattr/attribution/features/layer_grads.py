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

from collections.abc import Callable, Iterator
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


def shares_tensors(model: nn.Module) -> bool:
    """Whether one parameter or buffer tensor is reachable under two names (tied weights)."""
    named = [*model.named_parameters(remove_duplicate=False),
             *model.named_buffers(remove_duplicate=False)]  # fmt: skip
    return len({id(t) for _, t in named}) < len(named)


def layer_plan(model: nn.Module, param_names: list[str]) -> list[HookedLayer] | None:
    """The layers owning ``param_names``, or None if one of them is not a supported layer or
    the model shares a tensor between names (a shared weight's per-layer gradients would
    miss its other uses; such models take the vmap path, which ties them)."""
    if shares_tensors(model):
        return None
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
    or with ``projector`` (a :class:`~.layer_projection.LayerProjector`)
    their per-layer projections {parameter name: (``batch``, d)}.

    Every recorded call must be per sample (leading dimension ``batch``): a layer applied to
    something shared by the batch has no per-sample gradient this way (ConfigError).
    """
    grads: dict[str, torch.Tensor] = {}
    for index, layer, calls in layer_calls(plan, total, batch):
        which = set(layer.params)
        for a, delta in calls:
            if projector is None:
                parts = layer_sample_grads(layer.module, a, delta, which)
            else:
                parts = projector.layer_features(index, layer.module, a, delta, which)
            for local, g in parts.items():
                name = layer.params[local]
                grads[name] = grads[name] + g if name in grads else g
    return grads


def layer_calls(
    plan: list[HookedLayer], total: torch.Tensor, batch: int
) -> Iterator[tuple[int, HookedLayer, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """(index, layer, [(input a, output gradient δ) of each recorded call]) for every planned
    layer, δ = ∂total/∂output (zeros where the output did not reach ``total``); checks first
    that every call has one row per pair of the ``batch``."""
    check_per_sample(plan, batch)
    outputs = [o for layer in plan for o in layer.outputs]
    deltas = iter(torch.autograd.grad(total, outputs, allow_unused=True))
    for index, layer in enumerate(plan):
        calls = []
        for a, o in zip(layer.inputs, layer.outputs, strict=True):
            delta = next(deltas)
            calls.append((a, torch.zeros_like(o) if delta is None else delta))
        yield index, layer, calls


# --- Per-sample sums over a sample's pairs, contracted inside each layer's product -----------
#
# A sample z's K (sample, timestep) pairs form a segment. Its timestep-averaged feature needs
# Σ_t w_t g(z, t) only (w_t = 1, or 1/‖g(z, t)‖ with per-timestep normalisation), and for a
# weight
#
#     Σ_t w_t Σ_s δ_{t,s} a_{t,s}ᵀ = Σ_{(t,s)} (w_t δ_{t,s}) a_{t,s}ᵀ
#
# is one matrix product over the segment's K·S positions: one batched product per layer over
# the micro-batch gives per-sample (not per-pair) gradients, and no per-pair gradient is formed.
# The pair norms come first, from the same factors: ‖Σ_s δ_s a_sᵀ‖²_F directly, or when
# positions are few by ‖δᵀa‖²_F = Σ_{s,s'} (δ_s·δ_s')(a_s·a_s') (the "ghost norm").


@dataclass
class Outer:
    """A weight's per-pair gradient in factored form, Σ_s d[:, :, s] a[:, :, s]ᵀ, with
    d (b, out, S) and a (b, in, S); flattened row-major it is the (out·in) gradient."""

    d: torch.Tensor
    a: torch.Tensor


@dataclass
class ConvOuter:
    """A convolution weight's per-pair gradient as its input a (b, C_in, H, W) and output
    gradient d (b, C_out, H', W'): Σ_s d_s (patch_s)ᵀ, taken by the convolution's own
    weight-gradient kernel without unfolding patches (im2col)."""

    module: nn.Conv2d
    a: torch.Tensor
    d: torch.Tensor

    def grouped_sums(self, segments: int) -> torch.Tensor:
        """(segments, C_out·C_in·k_h·k_w): Σ over each segment's pairs of the weight
        gradient, one grouped weight-gradient call with the segments as groups (segment j's
        pairs are the batch of group j)."""
        m, a, d = self.module, self.a, self.d
        b = a.shape[0]
        L = b // segments
        ag = a.reshape(segments, L, *a.shape[1:]).transpose(0, 1).reshape(L, -1, *a.shape[2:])
        dg = d.reshape(segments, L, *d.shape[1:]).transpose(0, 1).reshape(L, -1, *d.shape[2:])
        shape = (segments * m.out_channels, m.in_channels, *m.kernel_size)
        weight = torch.empty(shape, dtype=a.dtype, device=a.device)
        g = torch.ops.aten.convolution_backward(
            dg, ag, weight, None, list(m.stride), list(m.padding), list(m.dilation), False,
            [0, 0], segments, [False, True, False],
        )[1]  # fmt: skip
        return g.reshape(segments, -1)


#: A parameter's per-pair gradient: factored (:class:`Outer`, :class:`ConvOuter`) or
#: explicit (b, d).
Term = Outer | ConvOuter | torch.Tensor
#: Elements of a per-pair gradient block the direct norm computation holds at once.
NORM_BLOCK_ELEMENTS = 1 << 24


def layer_factors(
    module: nn.Module, a: torch.Tensor, delta: torch.Tensor, which: set[str]
) -> dict[str, Term]:
    """{``weight``/``bias``: per-pair gradient term} of one call of ``module`` (float32)."""
    B = a.shape[0]
    if isinstance(module, nn.Linear):
        d = flat_positions(delta).float()
        out: dict[str, Term] = {}
        if "weight" in which:
            out["weight"] = Outer(d.transpose(1, 2), flat_positions(a).float().transpose(1, 2))
        if "bias" in which:
            out["bias"] = d.sum(dim=1)
        return out
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        d = delta.reshape(B, delta.shape[1], -1).float()
        out = {}
        if "weight" in which:
            out["weight"] = ConvOuter(module, a.float(), delta.float())
        if "bias" in which:
            out["bias"] = d.sum(dim=2)
        return out
    exact = layer_sample_grads(module, a, delta, which)
    return {k: v.reshape(B, -1).float() for k, v in exact.items()}


def term_pair_sq_norms(term: Term) -> torch.Tensor:
    """(b,) squared Frobenius norms of the per-pair gradients: the ghost-norm identity when
    S·(out + in) < out·in (cheaper), else the explicit products in blocks of pairs."""
    if isinstance(term, ConvOuter):
        m, b = term.module, term.a.shape[0]
        s_in, s_out = term.a[0, 0].numel(), term.d[0, 0].numel()
        k2 = m.kernel_size[0] * m.kernel_size[1]
        ghost = s_in**2 * m.in_channels + s_out**2 * (m.out_channels + k2)
        ghost = ghost < m.out_channels * m.in_channels * k2 * s_out
        size = s_in**2 if ghost else m.weight.numel()
        step = max(1, NORM_BLOCK_ELEMENTS // size)
        parts = []
        for s in range(0, b, step):
            a, d = term.a[s : s + step], term.d[s : s + step]
            if ghost:
                parts.append(conv_ghost_sq_norms(m, a, d))
            else:
                g = ConvOuter(m, a, d).grouped_sums(a.shape[0])
                parts.append(torch.linalg.vector_norm(g, dim=1).pow(2))
        return torch.cat(parts)
    if not isinstance(term, Outer):
        return term.pow(2).sum(dim=1)
    d, a = term.d, term.a
    b, o, S = d.shape
    i = a.shape[1]
    if S * (o + i) < o * i:
        dd = torch.bmm(d.transpose(1, 2), d)
        aa = torch.bmm(a.transpose(1, 2), a)
        return (dd * aa).sum(dim=(1, 2))
    step = max(1, NORM_BLOCK_ELEMENTS // (o * i))
    parts = []
    for s in range(0, b, step):
        g = torch.bmm(d[s : s + step], a[s : s + step].transpose(1, 2))
        parts.append(torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).pow(2))
    return torch.cat(parts)


def _valid_outputs(u: int, stride: int, dilation: int, pad: int, n_in: int, n_out: int):
    """Output positions [lo, hi) whose kernel tap u reads an input inside the image, and the
    input position of the first (input = o·stride + u·dilation − pad)."""
    lo = max(0, -(-(pad - u * dilation) // stride))
    hi = min(n_out, (n_in - 1 - u * dilation + pad) // stride + 1)
    return lo, hi, lo * stride + u * dilation - pad


def conv_ghost_sq_norms(module: nn.Conv2d, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(b,) ‖∇_W f‖²_F of a convolution per pair without forming the gradient or patches:
    ‖Σ_s d_s p_sᵀ‖² = Σ_{s,s'} (d_s·d_s')(p_s·p_s'), and the patches' inner products are sums
    of the input's Gram matrix over the kernel taps u, p_s·p_s' = Σ_u a_{s+u}·a_{s'+u}
    (taps outside the zero-padded image contribute nothing)."""
    b, c, h, w = a.shape
    o, ho, wo = d.shape[1:]
    x = a.reshape(b, c, h * w)
    gram = torch.bmm(x.transpose(1, 2), x).view(b, h, w, h, w)
    p = gram.new_zeros(b, ho, wo, ho, wo)
    (kh, kw), (sh, sw) = module.kernel_size, module.stride
    (dh, dw), (ph, pw) = module.dilation, module.padding
    for ui in range(kh):
        ilo, ihi, i0 = _valid_outputs(ui, sh, dh, ph, h, ho)
        if ihi <= ilo:
            continue
        si = slice(i0, i0 + sh * (ihi - ilo - 1) + 1, sh)
        for uj in range(kw):
            jlo, jhi, j0 = _valid_outputs(uj, sw, dw, pw, w, wo)
            if jhi <= jlo:
                continue
            sj = slice(j0, j0 + sw * (jhi - jlo - 1) + 1, sw)
            p[:, ilo:ihi, jlo:jhi, ilo:ihi, jlo:jhi] += gram[:, si, sj, si, sj]
    y = d.reshape(b, o, ho * wo)
    return (torch.bmm(y.transpose(1, 2), y) * p.view(b, ho * wo, ho * wo)).sum(dim=(1, 2))


def _by_segment(x: torch.Tensor, segments: int) -> torch.Tensor:
    """(b, C, S) → (segments, C, L·S), L = b / segments: a segment's positions side by side."""
    b, c, s = x.shape
    if segments == b:
        return x
    return x.reshape(segments, b // segments, c, s).transpose(1, 2).reshape(segments, c, -1)


def term_segment_sums(
    term: Term, segments: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(segments, d): Σ over each segment's pairs of w_pair · (per-pair gradient), the pairs of
    segment j being rows j·L … (j+1)·L − 1; one batched product for a factored term."""
    if isinstance(term, ConvOuter):
        d = term.d if weights is None else term.d * weights.view(-1, *[1] * (term.d.dim() - 1))
        return ConvOuter(term.module, term.a, d).grouped_sums(segments)
    if not isinstance(term, Outer):
        v = term if weights is None else term * weights[:, None]
        return v.reshape(segments, -1, v.shape[1]).sum(dim=1)
    d = term.d if weights is None else term.d * weights[:, None, None]
    g = torch.bmm(_by_segment(d, segments), _by_segment(term.a, segments).transpose(1, 2))
    return g.reshape(segments, -1)


def materialised(term: Term) -> torch.Tensor:
    """(b, d): a term's per-pair gradients, formed."""
    if isinstance(term, ConvOuter):
        return term.grouped_sums(term.a.shape[0])
    if isinstance(term, Outer):
        g = torch.bmm(term.d, term.a.transpose(1, 2))
        return g.reshape(g.shape[0], -1)
    return term


def segment_sample_grads(
    plan: list[HookedLayer],
    total: torch.Tensor,
    batch: int,
    segments: int,
    emit: Callable[[str, torch.Tensor], None],
    normalize: bool,
    factors: Callable | None = None,
    scale: float = 1.0,
) -> torch.Tensor | None:
    """Backpropagate ``total`` to the recorded layer outputs and hand ``emit(name, G)`` the
    per-segment sums G (segments, d) = c Σ_{pairs j of the segment} w_j g_j of every
    parameter, for ``batch`` pairs in ``segments`` equal consecutive segments; w_j = 1/‖g_j‖
    (the pair's gradient over all planned parameters) when ``normalize``, else 1, and c =
    ``scale`` (e.g. 1/K for a timestep average: folded into w, or into the backward pass's
    seed, so it costs no pass over the sums).

    ``factors(index, module, a, delta, which)`` gives a layer call's terms (default
    :func:`layer_factors`; logra passes its projected factors). Returns the (batch,) pair
    norms when ``normalize`` (the caller checks them for NaN/Inf), else None. A parameter the
    pass never reached gets no ``emit``.
    """
    terms: list[tuple[str, Term]] = []
    seed = total if normalize or scale == 1.0 else total * scale
    for index, layer, recorded in layer_calls(plan, seed, batch):
        which = set(layer.params)
        calls = [
            layer_factors(layer.module, a, delta, which)
            if factors is None
            else factors(index, layer.module, a, delta, which)
            for a, delta in recorded
        ]
        if len(calls) == 1:
            terms += [(layer.params[k], t) for k, t in calls[0].items()]
        elif calls:  # a layer called more than once: its pair gradient is the sum of calls
            for k in calls[0]:
                terms.append((layer.params[k], sum(materialised(c[k]) for c in calls)))
    weights = norms = None
    if normalize:
        sq = torch.zeros(batch, dtype=torch.float32, device=total.device)
        for _, term in terms:
            sq += term_pair_sq_norms(term)
        norms = sq.sqrt()
        if not torch.isfinite(norms).all():
            return norms
        weights = scale / norms.clamp_min(1e-30)
    for name, term in terms:
        emit(name, term_segment_sums(term, segments, weights))
    return norms


def check_per_sample(plan: list[HookedLayer], batch: int) -> None:
    """ConfigError unless every recorded call has one row per pair of the batch."""
    for layer in plan:
        for a, o in zip(layer.inputs, layer.outputs, strict=True):
            if a.dim() < 2 or a.shape[0] != batch or o.shape[0] != batch:
                name = next(iter(layer.params.values())).rpartition(".")[0] or "the model"
                raise ConfigError(
                    f"layer {name} was called on an input of shape {tuple(a.shape)}, not one "
                    f"row per sample of the batch of {batch}",
                    hint="use gradient strategy 'vmap' for this model",
                )


def recorded_bytes_per_pair(plan: list[HookedLayer], batch: int) -> int:
    """Bytes the recorded calls of a ``batch``-pair pass hold per pair as float32 factors:
    inputs (twice: the grouped weight-gradient call regroups them) and outputs with their
    gradients (three times: output, gradient, regrouped gradient)."""
    n = 0
    for layer in plan:
        for a, o in zip(layer.inputs, layer.outputs, strict=True):
            n += 2 * a.numel() + 3 * o.numel()
    return 4 * n // max(1, batch)
