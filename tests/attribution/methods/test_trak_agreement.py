"""Our TRAK agrees with MadryLab's independent implementation (``traker``, module ``trak``).

Same tiny UNet, same training/target images, same diffusion-loss measure, same timesteps and
the same keyed noise on both sides:

- gradients: traker's ``FunctionalGradientComputer`` (with a model-output function written here)
  gives the same per-sample, timestep-averaged loss gradients as our ``GradientComputer`` and
  ``featurize`` (raw and per-timestep normalised);
- kernel: traker's ``BasicScoreComputer`` on our stored features gives the same scores as our
  ``Kernel`` (primal and dual) with the same absolute λ, for N < k and N > k;
- end to end: a whole ``TRAKer`` run (its featurize, finalize and scoring, on our projection)
  reproduces our ``trak`` method.

traker quirks handled here: ``BasicScoreComputer.get_x_xtx_inv`` inverts XᵀX + λI in float32 and
divides the inverse by the mean of its absolute entries, so its scores are ours divided by
mean|G⁻¹| (computed below in float64); ``TRAKer`` also divides the projected gradients by √p,
so its ``lambda_reg`` is our λ / p and its scale factor p · mean|G⁻¹|.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

pytest.importorskip("trak")

from trak import TRAKer  # noqa: E402
from trak.gradient_computers import FunctionalGradientComputer  # noqa: E402
from trak.modelout_functions import AbstractModelOutput  # noqa: E402
from trak.projectors import AbstractProjector, NoOpProjector  # noqa: E402
from trak.score_computers import BasicScoreComputer  # noqa: E402

from diffattr.attribution.features.featurize import FeatureSettings, featurize  # noqa: E402
from diffattr.attribution.features.gradients import GradientComputer, TimestepSpec  # noqa: E402
from diffattr.attribution.features.measure import parse_measure  # noqa: E402
from diffattr.attribution.features.projection import Projector, make_projector  # noqa: E402
from diffattr.attribution.kernel import Kernel, gram_scale  # noqa: E402
from diffattr.attribution.methods import ScoreInputs, get_method  # noqa: E402
from diffattr.data import load_builtin  # noqa: E402
from diffattr.diffusion.presets import build_unet, use_classic_attention  # noqa: E402
from diffattr.diffusion.schedule import (  # noqa: E402
    ATTRIBUTION_NOISE_KEY,
    NoiseSchedule,
    keyed_noise,
)

N_TRAIN, N_TARGET, TIMESTEPS, NOISE_SEED, PROJ_SEED = 24, 4, 2, 0, 3
RELATIVE_LAMBDA = 0.1
SHAPE = (1, 8, 8)


class Setup:
    """Model, images and our features (identity projection: exact gradients)."""

    def __init__(self, tmp) -> None:
        torch.manual_seed(0)
        self.model = build_unet("tiny", 8, 1).eval()
        # SDPA has no vmap batching rule on CPU: both sides use the classic attention processor.
        use_classic_attention(self.model)
        digits = load_builtin("digits")
        n = N_TRAIN + N_TARGET
        self.images = digits.images[:n]
        self.ids = digits.ids[:n].numpy()
        self.schedule = NoiseSchedule()
        self.alphas = self.schedule.alphas_cumprod()
        self.spec = TimestepSpec(TIMESTEPS, "uniform", NOISE_SEED)
        self.tmp = tmp
        settings = FeatureSettings(
            measure="loss", timesteps=TIMESTEPS, noise_seed=NOISE_SEED, projector="identity"
        )
        store = featurize(
            self.model,
            self.images,
            self.ids,
            tmp / "exact",
            settings,
            self.schedule,
            "digits-28",
            progress=False,
        )
        self.normalized = torch.from_numpy(np.array(store.features))  # (n, p), normalize=True
        computer = GradientComputer(
            self.model,
            parse_measure("loss"),
            self.schedule,
            self.spec,
            noise_seed=NOISE_SEED,
            normalize=False,
        )
        self.raw = computer.compute(self.images, self.ids)[0]  # (n, p), normalize=False
        self.dim = computer.dim
        use_classic_attention(self.model)  # our computer may have switched it back to SDPA

    def timesteps(self, row: int) -> np.ndarray:
        return self.spec.for_sample(int(self.ids[row]), self.schedule.num_train_timesteps)

    def noise(self, row: int, t: int) -> torch.Tensor:
        return keyed_noise(ATTRIBUTION_NOISE_KEY, NOISE_SEED, int(self.ids[row]), int(t), SHAPE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Setup(tmp_path_factory.mktemp("trak_agreement"))
    finally:
        torch.set_num_threads(old)


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _assert_scores_agree(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol * np.abs(want).max())
    assert _max_rel_err(got, want) <= tol
    for t in range(want.shape[0]):
        assert spearmanr(got[t], want[t]).statistic >= 0.999


# -- gradients -----------------------------------------------------------------------------------


class PairLoss(AbstractModelOutput):
    """f = ‖ε_θ(x_t, t) − ε‖²/d for one (x_t, t, ε) pair."""

    def __init__(self) -> None:
        super().__init__()

    @staticmethod
    def get_output(model, weights, buffers, xt, t, noise):
        out = torch.func.functional_call(model, (weights, buffers), (xt[None], t[None])).sample
        return (out[0] - noise).pow(2).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


def test_traker_per_sample_gradients_match_ours(setup: Setup) -> None:
    rows, xts, ts, noises = [], [], [], []
    for r in range(len(setup.ids)):
        for t in setup.timesteps(r):
            a = setup.alphas[int(t)]
            eps = setup.noise(r, int(t))
            rows.append(r)
            xts.append(a.sqrt() * setup.images[r] + (1 - a).sqrt() * eps)
            ts.append(int(t))
            noises.append(eps)
    computer = FunctionalGradientComputer(setup.model, PairLoss(), setup.dim, torch.float32, "cpu")
    grads = computer.compute_per_sample_grad(
        (torch.stack(xts), torch.tensor(ts), torch.stack(noises))
    )
    flat = NoOpProjector(device="cpu").project(grads, model_id=0)  # named_parameters order
    assert flat.shape == (len(rows), setup.dim)
    assert rows == sorted(rows) and len(rows) == TIMESTEPS * len(setup.ids)
    per_pair = flat.view(len(setup.ids), TIMESTEPS, -1)

    torch.testing.assert_close(per_pair.mean(1), setup.raw, rtol=1e-4, atol=1e-6)
    unit = per_pair / per_pair.norm(dim=2, keepdim=True)
    torch.testing.assert_close(unit.mean(1), setup.normalized, rtol=1e-4, atol=1e-6)


# -- kernel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [64, 16], ids=["N<k", "N>k"])
@pytest.mark.parametrize("form", ["primal", "dual"])
def test_traker_score_computer_matches_kernel(setup: Setup, k: int, form: str) -> None:
    proj = make_projector("rademacher", setup.dim, k, seed=PROJ_SEED)
    phi = proj.project(setup.normalized).double()
    train, targets = phi[:N_TRAIN], phi[N_TRAIN:]
    lam = RELATIVE_LAMBDA * gram_scale(train.numpy())

    computer = BasicScoreComputer(dtype=torch.float64, device="cpu", lambda_reg=lam)
    features = computer.get_x_xtx_inv(train, computer.get_xtx(train))
    acc = torch.zeros(N_TRAIN, N_TARGET, dtype=torch.float64)
    computer.get_scores(features, targets, accumulator=acc)

    gram = train.numpy().T @ train.numpy() + lam * np.eye(k)
    scale = np.abs(np.linalg.inv(gram)).mean()  # traker's normalisation of (XᵀX + λI)⁻¹
    theirs = acc.numpy().T * scale
    kernel = Kernel.fit(train.numpy(), lam=lam, form=form)
    assert kernel.form == form and kernel.lam == lam
    _assert_scores_agree(theirs, kernel.cross(targets.numpy()), tol=1e-5)


# -- end to end ----------------------------------------------------------------------------------


class TimestepAveragedLoss(AbstractModelOutput):
    """f = mean over the sample's timesteps of ‖ε_θ(x_t, t) − ε‖²/d (x₀, (K,) t, (K, ...) ε)."""

    def __init__(self, alphas: torch.Tensor) -> None:
        super().__init__()
        self.alphas = alphas

    def get_output(self, model, weights, buffers, x0, t, noise):
        a = self.alphas[t].view(-1, *([1] * (x0.dim() - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = torch.func.functional_call(model, (weights, buffers), (xt, t)).sample
        return (out - noise).pow(2).mean(dim=(1, 2, 3)).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


class OurProjector(AbstractProjector):
    """traker's projector interface around one of our projectors (same matrix on both sides)."""

    def __init__(self, proj: Projector) -> None:
        super().__init__(proj.input_dim, proj.output_dim, PROJ_SEED, "rademacher", "cpu")
        self.proj = proj

    def project(self, grads, model_id):
        return self.proj.project(NoOpProjector(device="cpu").project(grads, model_id))


def test_traker_pipeline_matches_our_trak_method(setup: Setup) -> None:
    k = 16
    settings = FeatureSettings(
        measure="loss",
        timesteps=TIMESTEPS,
        noise_seed=NOISE_SEED,
        normalize=False,
        projector="rademacher",
        proj_dim=k,
        proj_seed=PROJ_SEED,
    )
    stores = [
        featurize(
            setup.model,
            setup.images[sl],
            setup.ids[sl],
            setup.tmp / f"sketch-{name}",
            settings,
            setup.schedule,
            f"digits-{name}",
            progress=False,
        )
        for name, sl in (("train", slice(0, N_TRAIN)), ("targets", slice(N_TRAIN, None)))
    ]
    train = np.asarray(stores[0].features, dtype=np.float64)
    targets = np.asarray(stores[1].features, dtype=np.float64)
    lam = RELATIVE_LAMBDA * gram_scale(train)
    kernel = Kernel.fit(train, lam=lam)
    ours = get_method("trak").score(
        ScoreInputs.of(kernel=kernel, target_features=targets, num_train=N_TRAIN)
    )

    def batch(rows: range) -> tuple[torch.Tensor, ...]:
        ts = np.stack([setup.timesteps(r) for r in rows])
        noise = torch.stack(
            [
                torch.stack([setup.noise(r, int(t)) for t in tr])
                for r, tr in zip(rows, ts, strict=True)
            ]
        )
        x0 = setup.images[list(rows)].unsqueeze(1).expand(-1, TIMESTEPS, -1, -1, -1)
        return x0.contiguous(), torch.as_tensor(ts), noise

    p = setup.dim
    use_classic_attention(setup.model)  # featurize may have switched it to SDPA (no vmap rule)
    traker = TRAKer(
        model=setup.model,
        task=TimestepAveragedLoss(setup.alphas),
        train_set_size=N_TRAIN,
        save_dir=str(setup.tmp / "traker"),
        device="cpu",
        projector=OurProjector(make_projector("rademacher", p, k, seed=PROJ_SEED)),
        use_half_precision=False,
        lambda_reg=lam / p,  # traker divides the projected gradients by √p
        logging_level=logging.ERROR,
    )
    traker.load_checkpoint(setup.model.state_dict(), model_id=0)
    traker.featurize(batch(range(N_TRAIN)), num_samples=N_TRAIN)
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", setup.model.state_dict(), 0, N_TARGET)
    traker.score(batch(range(N_TRAIN, N_TRAIN + N_TARGET)), num_samples=N_TARGET)
    theirs = np.asarray(traker.finalize_scores("targets"), dtype=np.float64).T

    gram = train.T @ train + lam * np.eye(k)
    scale = p * np.abs(np.linalg.inv(gram)).mean()  # mean|(G/p)⁻¹|
    _assert_scores_agree(theirs * scale, ours, tol=2e-5)
