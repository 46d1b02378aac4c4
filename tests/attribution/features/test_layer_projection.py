"""Per-layer (logra) projection of per-sample gradients, against explicit projections of the
exact per-pair gradients."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.features.featurize import FeatureSettings, gradient_computer
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec
from diffattr.attribution.features.layer_projection import LayerProjection
from diffattr.attribution.features.measure import make_measure
from diffattr.attribution.features.store import FeatureStore
from diffattr.attribution.methods.journey import journey_features
from diffattr.diffusion.sampling import sample
from diffattr.diffusion.schedule import NoiseSchedule
from diffattr.errors import ConfigError

SPEC = TimestepSpec(3)


def computer(model, **kw):
    kw.setdefault("micro_batch", 5)
    return GradientComputer(model, make_measure("das"), NoiseSchedule(), SPEC, **kw)


def kronecker_project(logra, grads):
    """Each parameter's per-pair gradients ({name: (B, *shape)}) projected by P_out G P_inᵀ
    (bias P_out b, norm vectors P v) with the logra computer's own matrices, concatenated."""
    where = {}  # parameter name -> (layer index, local name)
    for index, layer in enumerate(logra._plan):
        for local, name in layer.params.items():
            where[name] = (index, local)
    parts = []
    for name in logra.params:
        g = grads[name].double()
        index, local = where[name]
        mats = {
            k: None if v is None else v.double()
            for k, v in logra.layer_projector.matrices[index].items()
        }
        module = logra._plan[index].module
        if isinstance(module, nn.Linear | nn.Conv2d):
            p_out = mats["out"]
            if local == "weight":
                G = g.reshape(g.shape[0], g.shape[1], -1)
                if p_out is not None:
                    G = p_out @ G
                if mats["in"] is not None:
                    G = G @ mats["in"].T
                parts.append(G.reshape(g.shape[0], -1))
            else:
                parts.append(g if p_out is None else g @ p_out.T)
        else:
            p = mats[local]
            parts.append(g if p is None else g @ p.T)
    return torch.cat(parts, dim=1)


def explicit_logra(model, images, ids, rank, normalize):
    """Exact per-pair gradients (vmap), projected by :func:`kronecker_project`, normalised and
    averaged here."""
    logra = computer(model, layer_projection=LayerProjection(rank, seed=3), normalize=normalize)
    exact = computer(model, strategy="vmap")
    out = torch.zeros(len(ids), logra.dim)
    for rows, xt, t, noise, ab in exact.pairs(images, ids):
        grads, _, _ = exact.param_grads(xt, t, noise, ab)
        phi = kronecker_project(logra, grads)
        if normalize:
            phi = phi / phi.norm(dim=1, keepdim=True)
        out.index_add_(0, rows, phi.float())
    return logra, out / SPEC.num


@pytest.mark.parametrize("normalize", [True, False])
def test_logra_equals_explicit_kronecker_projection(tiny_model, small_set, normalize):
    images, ids = small_set.images[:4], small_set.ids[:4].numpy()
    logra, want = explicit_logra(tiny_model, images, ids, rank=4, normalize=normalize)
    got, err, res = logra.compute(images, ids)
    assert got.shape == want.shape and logra.dim < logra.num_params / 50
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    _, err2, res2 = computer(tiny_model, strategy="vmap").compute(images, ids)
    torch.testing.assert_close(err, err2, rtol=1e-5, atol=1e-7)


def test_full_rank_logra_is_the_exact_gradient(tiny_model, small_set):
    images, ids = small_set.images[:3], small_set.ids[:3].numpy()
    big = computer(tiny_model, layer_projection=LayerProjection(10**6))
    assert big.dim == big.num_params
    assert all(v is None for mats in big.layer_projector.matrices for v in mats.values())
    got = big.compute(images, ids)[0]
    want = computer(tiny_model, strategy="vmap").compute(images, ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_matrices_are_seeded_and_scaled(tiny_model, small_set):
    images, ids = small_set.images[:2], small_set.ids[:2].numpy()
    a = computer(tiny_model, layer_projection=LayerProjection(8, seed=0))
    b = computer(tiny_model, layer_projection=LayerProjection(8, seed=0), micro_batch=1)
    c = computer(tiny_model, layer_projection=LayerProjection(8, seed=1))
    fa = a.compute(images, ids)[0]
    torch.testing.assert_close(b.compute(images, ids)[0], fa, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(c.compute(images, ids)[0], fa)
    entries = torch.cat([m.reshape(-1) for mats in a.layer_projector.matrices
                         for m in mats.values() if m is not None])  # fmt: skip
    assert abs(float(entries.pow(2).mean()) * 8 - 1) < 0.05  # N(0, 1/k)
    for layer in a._plan:  # at most r² per weight, r per vector
        for local, name in layer.params.items():
            assert a.out_dims[name] <= (64 if local == "weight" and layer.module.weight.dim() > 1
                                        else 8)  # fmt: skip


def test_inner_products_are_preserved_on_average(tiny_model, small_set):
    """E[φ(z)ᵀφ(z')] = ḡ(z)ᵀḡ(z'): the mean over seeds approaches the exact inner product."""
    images, ids = small_set.images[:2], small_set.ids[:2].numpy()
    exact = computer(tiny_model, strategy="vmap", normalize=False).compute(images, ids)[0]
    want = float(exact[0].double() @ exact[1].double())
    got = []
    for seed in range(12):
        gc = computer(tiny_model, layer_projection=LayerProjection(16, seed), normalize=False)
        phi = gc.compute(images, ids)[0].double()
        got.append(float(phi[0] @ phi[1]))
    scale = float(exact[0].norm() * exact[1].norm())
    assert abs(np.mean(got) - want) < 0.15 * scale
    assert np.std(got) > 0  # a real projection


def test_logra_is_refused_where_it_cannot_run(tiny_model):
    with pytest.raises(ConfigError, match="strategy 'layers'"):
        computer(tiny_model, strategy="vmap", layer_projection=LayerProjection(4))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2))
    with pytest.raises(ConfigError, match="grouped"):
        GradientComputer(grouped, make_measure("das"), NoiseSchedule(), SPEC,
                         layer_projection=LayerProjection(2))  # fmt: skip
    embed = nn.Embedding(3, 2)
    with pytest.raises(ConfigError, match="logra needs"):
        GradientComputer(embed, make_measure("das"), NoiseSchedule(), SPEC,
                         layer_projection=LayerProjection(2))  # fmt: skip
    with pytest.raises(ConfigError, match="at least 1"):
        LayerProjection(0)


def test_logra_store_through_attributor(tiny_model, digits, tmp_path):
    train, targets = digits.subset(np.arange(12)), digits.images[100:102]
    settings = FeatureSettings(timesteps=2, projector="logra", proj_dim=4)
    att = Attributor(tiny_model, train, tmp_path / "f", method="das", settings=settings,
                     progress=False)  # fmt: skip
    store = att.featurize()
    assert store.settings["projector"]["kind"] == "logra"
    assert store.settings["projector"]["rank"] == 4
    assert store.settings["num_params"] == sum(p.numel() for p in tiny_model.parameters())
    gc = computer(tiny_model, layer_projection=LayerProjection(4))
    assert store.dim == gc.dim
    scores = att.score(targets)
    assert scores.values.shape == (2, 12) and np.isfinite(scores.values).all()
    again = Attributor(tiny_model, train, tmp_path / "f", method="das", settings=settings,
                       progress=False).score(targets)  # fmt: skip
    assert np.array_equal(again.values, scores.values)  # the store is reused


def test_journey_features_under_logra(tiny_model, tmp_path):
    """Journey-TRAK with logra: unnormalised, the per-layer projection of the exact journey
    features (projection is linear); normalised, a store of its own with the logra kind."""
    samples = sample(tiny_model, [5, 6], num_steps=2, progress=False)
    exact = FeatureSettings(measure="loss", timesteps=1, projector="identity", normalize=False)
    logra = replace(exact, projector="logra", proj_dim=4, proj_seed=3)
    full = journey_features(tiny_model, samples, exact)
    got = journey_features(tiny_model, samples, logra, store_dir=tmp_path / "a")
    gc = gradient_computer(tiny_model, logra, NoiseSchedule(), (1, 8, 8))
    grads, start = {}, 0
    for name, p in gc.params.items():
        grads[name] = torch.from_numpy(full[:, start : start + p.numel()]).reshape(2, *p.shape)
        start += p.numel()
    want = kronecker_project(gc, grads).numpy()
    assert got.shape == want.shape == (2, gc.dim) and gc.dim < full.shape[1] / 50
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    normed = replace(logra, normalize=True)
    phi = journey_features(tiny_model, samples, normed, store_dir=tmp_path / "b")
    (store,) = (tmp_path / "b").glob("journey-*")
    assert FeatureStore.load(store).settings["projector"]["kind"] == "logra"
    assert phi.shape == got.shape and not np.allclose(phi, got)
