"""embedding-cos: a user encoder against an explicit cosine; the seeded, cached in-domain one."""

import json

import numpy as np
import torch

from diffattr.attribution.attributor import Attributor
from diffattr.attribution.methods import ScoreInputs, get_method, method_meta
from diffattr.attribution.methods.embedding import IN_DOMAIN_LABEL, EncoderSettings, train_encoder

FAST = {"steps": 25, "dim": 8, "width": 4}


def test_user_encoder_equals_explicit_cosine(digits):
    train, targets = digits.images[:12], digits.images[100:103]
    w = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))

    def encoder(x):
        return torch.tanh(x.reshape(x.shape[0], -1) @ w)

    a, b = encoder(targets).double().numpy(), encoder(train).double().numpy()
    want = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    method = get_method("embedding-cos", encoder=encoder)
    got = method.score(ScoreInputs.of(train_images=train, target_images=targets))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    meta = method_meta(method)
    assert meta["embedding"].startswith("user encoder") and meta["options"]["encoder"]
    json.dumps(meta)  # savable
    # numpy outputs work too
    got_np = get_method("embedding-cos", encoder=lambda x: encoder(x).numpy()).score(
        ScoreInputs.of(train_images=train, target_images=targets)
    )
    np.testing.assert_allclose(got_np, want, rtol=1e-6)


def test_in_domain_encoder_is_seeded_and_cached(digits, tmp_path):
    train_set, targets = digits.subset(np.arange(12)), digits.images[100:103]
    s = EncoderSettings(**FAST)
    e1, e2 = train_encoder(train_set.images, s), train_encoder(train_set.images, s)
    for p, q in zip(e1.parameters(), e2.parameters(), strict=True):
        assert torch.equal(p, q)

    inputs = ScoreInputs.of(
        train_images=train_set.images,
        target_images=targets,
        train_ids=train_set.ids.numpy(),
        store_dir=tmp_path,
    )
    method = get_method("embedding-cos", **FAST)
    first = method.score(inputs)
    assert method.score_meta["embedding"] == IN_DOMAIN_LABEL
    cache = list(tmp_path.glob("embedding-*"))
    assert len(cache) == 1 and (cache[0] / "encoder.pt").is_file()
    mtime = (cache[0] / "encoder.pt").stat().st_mtime_ns
    second = get_method("embedding-cos", **FAST).score(inputs)
    assert np.array_equal(first, second)
    assert (cache[0] / "encoder.pt").stat().st_mtime_ns == mtime  # loaded, not retrained
    # explicit cosine with the trained encoder
    with torch.no_grad():
        a, b = e1(targets).double().numpy(), e1(train_set.images).double().numpy()
    want = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(first, want, rtol=1e-5)
    # other settings → another cache entry
    get_method("embedding-cos", **{**FAST, "seed": 1}).score(inputs)
    assert len(list(tmp_path.glob("embedding-*"))) == 2


def test_through_attributor(tiny_model, digits, tmp_path):
    train, targets = digits.subset(np.arange(12)), digits.images[100:102]
    att = Attributor(tiny_model, train, tmp_path, method="embedding-cos", progress=False, **FAST)
    scores = att.score(targets)
    assert scores.values.shape == (2, 12)
    assert scores.meta["embedding"] == IN_DOMAIN_LABEL
    assert list(tmp_path.glob("embedding-*"))  # cached next to the features
    scores.save(tmp_path / "out")  # meta is JSON-safe
