"""Per-layer Kronecker projection of per-sample gradients, from activations and output
gradients (the LoGra idea): no full per-sample gradient is ever formed.

For a layer y = W a + b (W of shape out × in; a convolution's ``in`` is its unfolded patch,
C_in·k_h·k_w), two seeded Gaussian matrices P_out (k_o × out) and P_in (k_i × in) with
N(0, 1/k) entries project the weight's per-sample gradient as

    φ_W(z) = P_out ∇_W f(z) P_inᵀ = Σ_s (P_out δ_s)(P_in a_s)ᵀ        (k_o × k_i)

so only the projected activations P_in a_s (for a convolution: one convolution of the input
with P_in as k_i filters) and the projected output gradients P_out δ_s are needed, and the
per-sample product is k_o × k_i instead of out × in. The bias gives φ_b = P_out Σ_s δ_s; a
norm layer's γ and β gradients (vectors of C) get their own k × C matrix. A side no larger
than k is left unprojected (exact); E[PᵀP] = I on every side, so E[φ(z)ᵀφ(z')] = ∇f(z)ᵀ∇f(z').

Rank r (``--proj-dim`` for ``--projector logra``): k_o = min(r, out), k_i = min(r, in), so a
layer contributes at most r² dimensions (+ r per bias or norm vector). With per-timestep
normalisation the norm is that of the projected pair gradient. The matrices depend on
(seed, the layer's position among the differentiated layers, side) only, so every process
and batch size gives the same features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffattr.attribution.features.layer_grads import (
    HookedLayer,
    Outer,
    Term,
    conv_patches,
    flat_positions,
    layer_sample_grads,
    materialised,
)
from diffattr.errors import ConfigError
from diffattr.seeding import generator

#: Key namespace of the projection matrices.
LOGRA_KEY = 0x4C475241
#: ``--proj-dim`` default for ``--projector logra``: the per-layer rank r.
DEFAULT_LOGRA_RANK = 16


@dataclass(frozen=True)
class LayerProjection:
    """Settings of the per-layer projection: rank r and seed."""

    rank: int = DEFAULT_LOGRA_RANK
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or int(self.rank) < 1:
            raise ConfigError(f"--proj-dim (the logra rank) must be at least 1, got {self.rank}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gaussian(rows: int, cols: int, *keys: int) -> torch.Tensor | None:
    """(rows × cols) N(0, 1/rows) matrix, or None (identity) when rows ≥ cols."""
    if rows >= cols:
        return None
    g = generator(LOGRA_KEY, *keys)
    return torch.randn(rows, cols, generator=g, dtype=torch.float32) / rows**0.5


def _weight_in_dim(module: nn.Module) -> int:
    """Columns of the weight as a matrix: in, or C_in·k_h·k_w for a convolution."""
    return module.weight[0].numel()


class LayerProjector:
    """The projection matrices of every planned layer and the projected per-sample gradients.

    ``out_dims``: {parameter name: projected dimension}, in the plan's parameter order.
    """

    def __init__(
        self, plan: list[HookedLayer], settings: LayerProjection, device: torch.device
    ) -> None:
        self.settings = settings
        r, seed = int(settings.rank), int(settings.seed)
        self.matrices: list[dict[str, torch.Tensor | None]] = []
        self.out_dims: dict[str, int] = {}
        for index, layer in enumerate(plan):
            m = layer.module
            mats: dict[str, torch.Tensor | None] = {}
            if isinstance(m, nn.Conv2d) and m.groups != 1 and "weight" in layer.params:
                name = layer.params["weight"]
                raise ConfigError(
                    f"--projector logra does not handle grouped convolutions ({name}: "
                    f"groups={m.groups})",
                    hint="use another --projector for this model, or leave the layer out with "
                    "--params",
                )
            if isinstance(m, nn.Linear | nn.Conv2d):
                out = m.weight.shape[0]
                mats["out"] = _gaussian(r, out, seed, index, 0)
                if "weight" in layer.params:
                    cols = _weight_in_dim(m)
                    mats["in"] = _gaussian(r, cols, seed, index, 1)
                    self.out_dims[layer.params["weight"]] = min(r, out) * min(r, cols)
                if "bias" in layer.params:
                    self.out_dims[layer.params["bias"]] = min(r, out)
            else:  # GroupNorm / LayerNorm: vectors of C
                for side, local in enumerate(("weight", "bias"), start=2):
                    if local in layer.params:
                        c = getattr(m, local).numel()
                        mats[local] = _gaussian(r, c, seed, index, side)
                        self.out_dims[layer.params[local]] = min(r, c)
            self.matrices.append({k: None if v is None else v.to(device) for k, v in mats.items()})
        self.dim = sum(self.out_dims.values())

    def describe(self) -> dict[str, object]:
        return {"kind": "logra", **self.settings.to_dict(), "output_dim": self.dim}

    def layer_features(
        self, index: int, module: nn.Module, a: torch.Tensor, delta: torch.Tensor, which: set[str]
    ) -> dict[str, torch.Tensor]:
        """Projected per-sample gradients {local name: (B, d)} of one call of layer ``index``
        (:meth:`layer_factors`, each formed)."""
        terms = self.layer_factors(index, module, a, delta, which)
        return {k: materialised(t) for k, t in terms.items()}

    def layer_factors(
        self, index: int, module: nn.Module, a: torch.Tensor, delta: torch.Tensor, which: set[str]
    ) -> dict[str, Term]:
        """The projected per-pair gradients of one call of layer ``index`` as terms
        (:func:`~.layer_grads.segment_sample_grads`): φ_W = Σ_s (P_out δ_s)
        (P_in a_s)ᵀ factored, φ_b and norm-layer vectors explicit."""
        mats = self.matrices[index]
        B = a.shape[0]
        if not isinstance(module, nn.Linear | nn.Conv2d):
            exact = layer_sample_grads(module, a, delta, which)
            return {k: _right(v.float(), mats[k]) for k, v in exact.items()}
        p_out, p_in = mats["out"], mats.get("in")
        if isinstance(module, nn.Conv2d):
            d = delta.reshape(B, delta.shape[1], -1).float()  # (B, out, L)
        else:
            d = flat_positions(delta).float().transpose(1, 2)  # (B, out, S)
        d = d if p_out is None else torch.matmul(p_out, d)  # (B, k_o, L)
        out: dict[str, Term] = {}
        if "weight" in which:
            out["weight"] = Outer(d, self._projected_inputs(module, a, p_in))
        if "bias" in which:
            out["bias"] = d.sum(dim=2)
        return out

    @staticmethod
    def _projected_inputs(
        module: nn.Module, a: torch.Tensor, p_in: torch.Tensor | None
    ) -> torch.Tensor:
        """P_in a_s for every position s: (B, k_i, L)."""
        a = a.float()
        if isinstance(module, nn.Linear):
            x = flat_positions(a)  # (B, S, in)
            x = x if p_in is None else torch.matmul(x, p_in.T)
            return x.transpose(1, 2)
        m = module
        if p_in is None:
            return conv_patches(m, a)
        filters = p_in.reshape(p_in.shape[0], *m.weight.shape[1:])  # groups == 1 (checked)
        y = F.conv2d(a, filters, None, m.stride, m.padding, m.dilation)
        return y.reshape(y.shape[0], y.shape[1], -1)


def _right(v: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """(B, C) vectors projected by P (k × C): (B, k), or unchanged when P is the identity."""
    return v if p is None else v @ p.T
