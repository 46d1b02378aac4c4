"""Per-layer assembly of per-sample gradients against autograd, one sample at a time."""

import pytest
import torch
from torch import nn

from diffattr.attribution.features.layer_grads import (
    ConvOuter,
    assemble_sample_grads,
    conv_ghost_sq_norms,
    layer_plan,
    recording,
    segment_sample_grads,
    term_pair_sq_norms,
)
from diffattr.errors import ConfigError


def reference(model, inputs, loss):
    """Per-sample gradients by one ordinary backward pass per sample."""
    out = {n: [] for n, _ in model.named_parameters()}
    for x in inputs:
        model.zero_grad()
        loss(model(x[None])).backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    return {n: torch.stack(g) for n, g in out.items()}


def assembled(model, inputs, loss):
    plan = layer_plan(model, [n for n, _ in model.named_parameters()])
    assert plan is not None
    with torch.enable_grad(), recording(plan):
        values = torch.stack([loss(y[None]) for y in model(inputs)])
        return assemble_sample_grads(plan, values.sum(), inputs.shape[0])


def segment_sums(model, inputs, loss, segments, normalize):
    """{name: (segments, d)} from :func:`segment_sample_grads`, and the pair norms."""
    names = [n for n, _ in model.named_parameters()]
    plan = layer_plan(model, names)
    got: dict[str, torch.Tensor] = {}

    def emit(name, g):
        got[name] = got[name] + g if name in got else g

    with torch.enable_grad(), recording(plan):
        values = torch.stack([loss(y[None]) for y in model(inputs)])
        norms = segment_sample_grads(plan, values.sum(), inputs.shape[0], segments, emit, normalize)
    return got, norms


def check(model, inputs, loss=lambda y: (y.sin() * y).sum()):
    torch.manual_seed(0)
    ref = reference(model, inputs, loss)
    got = assembled(model, inputs, loss)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5 * float(ref[n].abs().max()))
    # per-segment sums Σ_j w_j g_j over consecutive pairs, w_j = 1 or 1/‖g_j‖
    b = inputs.shape[0]
    flat = torch.cat([ref[n].reshape(b, -1) for n in ref], dim=1)
    for segments in [s for s in range(1, b + 1) if b % s == 0]:
        for normalize in (False, True):
            sums, norms = segment_sums(model, inputs, loss, segments, normalize)
            w = 1 / flat.norm(dim=1) if normalize else torch.ones(b)
            want = (w[:, None] * flat).reshape(segments, b // segments, -1).sum(dim=1)
            have = torch.cat(
                [sums.get(n, torch.zeros(segments, ref[n][0].numel())) for n in ref], dim=1
            )
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            if normalize:
                torch.testing.assert_close(norms, flat.norm(dim=1), rtol=1e-4, atol=0.0)
            else:
                assert norms is None


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, padding=1, stride=2),
        dict(kernel_size=1),
        dict(kernel_size=(3, 2), padding=(1, 0), dilation=2),
        dict(kernel_size=3, padding=1, groups=2),
        dict(kernel_size=3, padding=1, bias=False),
    ],
)
def test_conv2d(conv):
    torch.manual_seed(1)
    check(nn.Conv2d(4, 6, **conv), torch.randn(3, 4, 7, 6))


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, padding=1, stride=2),
        dict(kernel_size=3, padding=0, stride=2),
        dict(kernel_size=1),
        dict(kernel_size=(3, 2), padding=(2, 0), dilation=2),
        dict(kernel_size=5, padding=1, stride=(2, 3)),
    ],
)
def test_conv_ghost_norms_equal_the_gradients_norms(conv):
    torch.manual_seed(5)
    m = nn.Conv2d(3, 5, **conv)
    a = torch.randn(4, 3, 7, 6)
    d = torch.randn_like(m(a))
    explicit = ConvOuter(m, a, d).grouped_sums(4)  # one segment per pair: its gradient
    ref = reference(m, a, lambda y: (y * d[0:1]).sum())  # only for the first pair's check
    torch.testing.assert_close(explicit[0], ref["weight"][0].reshape(-1), rtol=1e-4, atol=1e-5)
    want = explicit.pow(2).sum(dim=1)
    torch.testing.assert_close(conv_ghost_sq_norms(m, a, d), want, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(term_pair_sq_norms(ConvOuter(m, a, d)), want, rtol=1e-4, atol=0.0)


def test_linear_on_tokens_and_vectors():
    torch.manual_seed(2)
    check(nn.Linear(5, 3), torch.randn(4, 5))
    check(nn.Linear(5, 3), torch.randn(4, 7, 5))
    check(nn.Linear(5, 3, bias=False), torch.randn(4, 2, 3, 5))


def test_norm_layers():
    torch.manual_seed(3)
    gn = nn.GroupNorm(2, 4)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    check(gn, torch.randn(3, 4, 5, 5))
    ln = nn.LayerNorm((6,))
    nn.init.normal_(ln.weight)
    check(ln, torch.randn(3, 7, 6))


def test_network_with_shared_layer_and_a_branch_without_input_gradient():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.norm = nn.GroupNorm(2, 4)
            self.shared = nn.Linear(4, 4)  # called twice per forward pass
            self.const = nn.Linear(3, 4)  # its input never depends on x
            self.register_buffer("c", torch.ones(3))

        def forward(self, x):
            h = torch.nn.functional.silu(self.norm(self.conv(x)))  # (B, 4, H, W)
            h = h.flatten(2).transpose(1, 2)  # tokens (B, HW, 4)
            c = self.c.expand(x.shape[0], 3)
            return self.shared(torch.relu(self.shared(h))).mean(dim=1) + self.const(c)

    torch.manual_seed(4)
    check(Net(), torch.randn(3, 2, 4, 4))


def test_a_layer_shared_by_the_batch_is_refused():
    layer = nn.Linear(3, 2)
    plan = layer_plan(layer, ["weight", "bias"])
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(ConfigError, match="one row per sample"), recording(plan):
        out = x[:, :2] * layer(torch.ones(3))  # the layer's output is broadcast over samples
        assemble_sample_grads(plan, out.sum(), 4)


def test_unsupported_layers_give_no_plan():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert layer_plan(model, ["0.weight", "1.weight"]) is None
    plan = layer_plan(model, ["0.weight"])
    assert plan is not None and plan[0].params == {"weight": "0.weight"}
    reflect = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    assert layer_plan(reflect, ["weight"]) is None
    same = nn.Conv2d(1, 1, 3, padding="same")
    assert layer_plan(same, ["weight"]) is None


def test_hooks_are_removed():
    model = nn.Linear(2, 2)
    plan = layer_plan(model, ["weight", "bias"])
    with recording(plan):
        model(torch.randn(1, 2))
        assert len(plan[0].inputs) == 1
    assert not plan[0].inputs and not model._forward_hooks
