"""The λ rules of the kernel (attribution.ridge) and the defaults the docs document."""

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize

from diffattr.attribution.kernel import Kernel
from diffattr.attribution.kernel import ridge as ridge_module
from diffattr.attribution.kernel.ridge import DEFAULT_RIDGE, Ridge
from diffattr.attribution.methods import METHODS, get_method
from diffattr.errors import ConfigError

METHODS_PAGE = Path(__file__).resolve().parents[3] / "docs" / "methods.md"  # "Choosing λ"


def features(n, k, seed=0, decay=0.8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) * np.arange(1, k + 1) ** -decay


def df_lambda(phi, fraction):
    """Written out: the λ at which Σ σ/(σ+λ) over the spectrum of ΦᵀΦ is fraction·min(N, k)."""
    sigma = np.linalg.eigvalsh(phi.T @ phi if phi.shape[0] >= phi.shape[1] else phi @ phi.T)
    target = fraction * min(phi.shape)
    return scipy.optimize.brentq(lambda x: np.sum(sigma / (sigma + x)) - target, 1e-14, 1e8)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
@pytest.mark.parametrize("fraction", [0.1, 0.4, 0.9])
def test_effective_dim_rule_solves_its_equation_in_both_forms(shape, fraction):
    phi = features(*shape)
    want = df_lambda(phi, fraction)
    rule = Ridge("effective-dim", fraction)
    for form in ("primal", "dual"):
        assert Kernel.fit(phi, rule, form=form).lam == pytest.approx(want, rel=1e-6)


def test_relative_and_absolute_rules():
    phi = features(30, 50)
    mean_eig = (phi**2).sum() / 30
    assert Kernel.fit(phi, Ridge("relative", 0.3)).lam == pytest.approx(0.3 * mean_eig)
    assert Kernel.fit(phi, Ridge("absolute", 0.7)).lam == 0.7
    assert Kernel.fit(phi, 0.7).lam == 0.7  # a float is an absolute λ
    # the default keeps 200 dimensions, at most half of min(N, k): here 15 of 30
    assert Kernel.fit(phi).lam == pytest.approx(df_lambda(phi, 0.5), rel=1e-6)
    big = features(450, 600)
    assert Kernel.fit(big, form="dual").lam == pytest.approx(df_lambda(big, 200 / 450), rel=1e-6)


def test_rule_adapts_to_the_spectrum_where_a_relative_lambda_does_not():
    """A faster-decaying spectrum gets a smaller λ relative to its mean eigenvalue."""
    slow, fast = features(60, 200, decay=0.3), features(60, 200, decay=1.5)
    rel = [Kernel.fit(p).lam / ((p**2).sum() / 60) for p in (slow, fast)]
    assert rel[1] < rel[0] / 10


def test_lanczos_estimate_agrees_with_the_exact_spectrum(monkeypatch):
    """Above EXACT_SPECTRUM_MAX df comes from stochastic Lanczos quadrature: λ within 10%."""
    phi = features(300, 500, seed=3) + 0.2 * np.random.default_rng(4).standard_normal((1, 500))
    gram = phi @ phi.T
    exact = Ridge("effective-dim", 0.4).resolve(gram)
    monkeypatch.setattr(ridge_module, "EXACT_SPECTRUM_MAX", 16)
    estimate = Ridge("effective-dim", 0.4).resolve(gram)
    assert estimate == pytest.approx(exact, rel=0.1)
    assert Ridge("effective-dim", 0.4).resolve(gram) == estimate  # seeded


def test_parse_and_bad_rules():
    assert Ridge.parse("effective-dim:200") == DEFAULT_RIDGE
    assert Ridge.parse("effective-dim:0.4") == Ridge("effective-dim", 0.4)
    assert Ridge.parse("relative:1e-3") == Ridge("relative", 0.001)
    assert str(Ridge("relative", 0.001)) == "relative:0.001"
    for bad in ("effective-dim", "effective-dim:x", "spectral:0.4"):
        with pytest.raises(ConfigError):
            Ridge.parse(bad)
    for rule, value in (("effective-dim", 1.5), ("effective-dim", 0), ("relative", -1)):
        with pytest.raises(ConfigError):
            Ridge(rule, value)


def test_each_method_default_is_the_one_the_docs_document():
    """docs/methods.md's "Choosing λ" table lists every kernel method's default rule; the code
    agrees."""
    text = METHODS_PAGE.read_text()
    documented = dict(re.findall(r"^\| `([a-z-]+)` \| `([a-z-]+:[0-9.e-]+)` \|", text, re.M))
    kernel_methods = sorted(n for n, m in METHODS.items() if m.default_ridge is not None)
    assert kernel_methods, "no kernel methods registered"
    assert sorted(documented) == kernel_methods
    for name in kernel_methods:
        assert get_method(name).default_ridge == Ridge.parse(documented[name]), name
    assert Ridge("effective-dim", 200) == DEFAULT_RIDGE
