import numpy as np
import pytest
import torch

from diffattr.attribution.features.gradients import (
    GradientComputer,
    TimestepSpec,
    select_parameters,
)
from diffattr.attribution.features.measure import VARIANTS, make_measure
from diffattr.diffusion.schedule import ATTRIBUTION_NOISE_KEY, NoiseSchedule, keyed_noise
from diffattr.errors import ConfigError, NumericalError


def loop_gradient(model, measure, x0, sid, timesteps, normalize, names=None):
    """Reference: one ordinary backward pass per (sample, timestep)."""
    ab = NoiseSchedule().alphas_cumprod()
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    acc = torch.zeros(sum(p.numel() for p in params))
    for t in timesteps:
        eps = keyed_noise(ATTRIBUTION_NOISE_KEY, 0, sid, int(t), tuple(x0.shape))
        xt = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        model.zero_grad()
        out = model(xt[None], torch.tensor([int(t)])).sample[0]
        measure(out, eps, ab[t]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        acc += g / g.norm() if normalize else g
    return acc / len(timesteps)


@pytest.mark.parametrize("strategy", ["layers", "vmap", "backward"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "name,variant", [("das", "mean"), ("dtrak", "square"), ("loss", "mean"), ("das", "sketch")]
)
def test_strategies_equal_loop(tiny_model, small_set, name, variant, normalize, strategy):
    measure = make_measure(name, variant, output_shape=(1, 8, 8))
    spec = TimestepSpec(3, "uniform")
    gc = GradientComputer(
        tiny_model, measure, NoiseSchedule(), spec, normalize=normalize, micro_batch=4,
        strategy=strategy,
    )  # fmt: skip
    x0, ids = small_set.images[:3], small_set.ids[:3].numpy()
    g, err, res = gc.compute(x0, ids)
    for i in range(3):
        ts = spec.for_sample(0, 1000)
        ref = loop_gradient(tiny_model, measure, x0[i], int(ids[i]), ts, normalize)
        torch.testing.assert_close(g[i], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert err.shape == (3,) and torch.all(err > 0)
    other = GradientComputer(
        tiny_model, measure, NoiseSchedule(), spec, normalize=normalize, micro_batch=4,
        strategy="vmap" if strategy == "backward" else "backward",
    )  # fmt: skip
    _, err2, res2 = other.compute(x0, ids)
    torch.testing.assert_close(err, err2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res, res2, rtol=1e-5, atol=1e-7)


def test_auto_strategy_and_bad_strategy(tiny_model):
    def make(k=8, **kw):
        spec = TimestepSpec(k)
        return GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec, **kw)

    assert make(normalize=True).strategy == "layers"
    assert make(normalize=False).strategy == "layers"  # a small model

    assert make(normalize=False, strategy="vmap").strategy == "vmap"
    with pytest.raises(ConfigError, match="gradient strategy"):
        make(strategy="fast")
    tiny_model.register_buffer("unused", torch.zeros(1))  # buffers do not matter
    assert make(strategy="layers").strategy == "layers"


def test_models_sharing_a_tensor_keep_it_tied():
    """functional_call's tying runs only for a model whose names share a tensor; its
    gradient is then the sum over both uses, as an ordinary backward pass gives."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.b = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.b.weight = self.a.weight

        def forward(self, x, t):
            return type("Out", (), {"sample": self.b(torch.tanh(self.a(x)))})()

    torch.manual_seed(0)
    model = Shared()
    spec = TimestepSpec(2)
    x = torch.randn(1, 1, 4, 4)
    want = loop_gradient(model, make_measure("das"), x[0], 0, spec.for_sample(0, 1000), False)
    for strategy in ("auto", "vmap", "backward"):
        comp = GradientComputer(
            model, make_measure("das"), NoiseSchedule(), spec, normalize=False, strategy=strategy
        )
        assert comp.tie_weights and comp.strategy != "layers"  # its hooks would miss a use
        got = comp.compute(x, np.array([0]))[0][0]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    untied = GradientComputer(torch.nn.Conv2d(1, 1, 3), make_measure("das"), NoiseSchedule(), spec)
    assert not untied.tie_weights


def test_unsupported_layer_falls_back_to_vmap():
    class WithEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(1000, 4)
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t):
            out = self.conv(x) + self.embed(t).mean(dim=1).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": out})()

    def make(**kw):
        return GradientComputer(
            WithEmbedding(), make_measure("das"), NoiseSchedule(), TimestepSpec(2), **kw
        )

    assert make().strategy == "vmap"
    spec = TimestepSpec(8)
    wide = GradientComputer(WithEmbedding(), make_measure("das"), NoiseSchedule(), spec)
    assert wide.strategy == "vmap"
    many = GradientComputer(
        WithEmbedding(), make_measure("das"), NoiseSchedule(), spec, normalize=False
    )
    assert many.strategy == "backward"
    with pytest.raises(ConfigError, match="Linear, Conv2d"):
        make(strategy="layers")
    assert make(param_names=["conv.weight", "conv.bias"]).strategy == "layers"


def test_unnormalised_and_param_selection(tiny_model, small_set):
    names = select_parameters(tiny_model, r"attentions")
    assert names and all("attentions" in n for n in names)
    measure = make_measure("loss")
    spec = TimestepSpec(2, "first")
    gc = GradientComputer(
        tiny_model, measure, NoiseSchedule(), spec, normalize=False, param_names=names
    )
    g, _, _ = gc.compute(small_set.images[:2], small_set.ids[:2].numpy())
    ref = loop_gradient(
        tiny_model, measure, small_set.images[0], int(small_set.ids[0]), [0, 1], False, set(names)
    )
    torch.testing.assert_close(g[0], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("normalize", [True, False])
def test_batch_composition_does_not_change_rows(tiny_model, small_set, normalize):
    gc = GradientComputer(
        tiny_model, make_measure("das"), NoiseSchedule(), TimestepSpec(2), normalize=normalize
    )
    a, _, _ = gc.compute(small_set.images[:4], small_set.ids[:4].numpy())
    b, _, _ = gc.compute(small_set.images[2:3], small_set.ids[2:3].numpy())
    torch.testing.assert_close(a[2], b[0], rtol=1e-5, atol=1e-6 * float(a.abs().max()))


def test_timestep_strategies():
    assert TimestepSpec(10).for_sample(0, 1000).tolist() == list(range(0, 1000, 100))
    assert TimestepSpec(3, "first").for_sample(0, 1000).tolist() == [0, 1, 2]
    r1 = TimestepSpec(5, "random", seed=1).for_sample(7, 1000)
    assert np.array_equal(r1, TimestepSpec(5, "random", seed=1).for_sample(7, 1000))
    assert len(set(r1.tolist())) == 5
    with pytest.raises(ConfigError):
        TimestepSpec(5, "middle").validate(1000)


def test_measures_registry():
    for name, variants in VARIANTS.items():
        for v in variants:
            m = make_measure(name, v, output_shape=(1, 2, 2))
            out = torch.randn(1, 2, 2)
            assert m(out, torch.randn(1, 2, 2), torch.tensor(0.5)).dim() == 0
    with pytest.raises(ConfigError):
        make_measure("kl")
    with pytest.raises(ConfigError, match="variant"):
        make_measure("dtrak", "l3")


def test_bad_param_pattern(tiny_model):
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_parameters(tiny_model, "nope_nothing")


def _das_gradients(model, images, ids, dtype):
    from diffattr.attribution.features.measure import parse_measure

    measure = parse_measure("das", tuple(images.shape[1:]))
    gc = GradientComputer(model, measure, NoiseSchedule(), TimestepSpec(3), dtype=dtype)
    return gc.compute(images, ids)


def test_bf16_gradients_agree_with_fp32(tiny_model, small_set):
    x0, ids = small_set.images[:4], small_set.ids[:4].numpy()
    ref, ref_err, _ = _das_gradients(tiny_model, x0, ids, torch.float32)
    g, err, res = _das_gradients(tiny_model, x0, ids, torch.bfloat16)
    assert g.dtype == err.dtype == res.dtype == torch.float32
    assert not torch.equal(g, ref)  # really computed in bf16
    rel = (g - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 0.05, rel
    torch.testing.assert_close(err, ref_err, rtol=0.02, atol=1e-3)
    assert next(tiny_model.parameters()).dtype == torch.float32  # the model is not cast


def test_fp16_on_cpu_works_or_says_why(tiny_model, small_set):
    x0, ids = small_set.images[:2], small_set.ids[:2].numpy()
    try:
        g, _, _ = _das_gradients(tiny_model, x0, ids, torch.float16)
    except ConfigError as exc:
        assert "--grad-dtype fp16" in str(exc) and "bf16" in exc.hint
        return
    ref, _, _ = _das_gradients(tiny_model, x0, ids, torch.float32)
    assert ((g - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.05


def test_grad_dtype_names_and_store_keys():
    from diffattr.attribution.features.featurize import FeatureSettings
    from diffattr.attribution.features.gradients import grad_dtype

    assert grad_dtype("bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="--grad-dtype"):
        grad_dtype("fp8")
    fp32, bf16 = FeatureSettings(), FeatureSettings(grad_dtype="bf16")
    assert "grad_dtype" not in fp32.to_dict()  # stores made before the option keep their names
    assert bf16.to_dict()["grad_dtype"] == "bf16" and bf16.key() != fp32.key()


def test_device_is_checked():
    from diffattr.attribution.features.gradients import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device") as info:
            resolve_device("cuda")
        assert "--device cpu" in info.value.hint


def test_micro_batch_is_capped_by_gradient_bytes(tiny_model, small_set, monkeypatch):
    from diffattr.attribution.features import gradients

    x0, ids = small_set.images[:3], small_set.ids[:3].numpy()
    spec = TimestepSpec(2)
    big = GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec, micro_batch=64)
    assert big.micro_batch == 64
    monkeypatch.setattr(gradients, "MICRO_BATCH_BYTES", 4 * big.num_params * 3)
    small = GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec, micro_batch=64)
    assert small.micro_batch == 3 and small.requested_micro_batch == 64
    torch.testing.assert_close(small.compute(x0, ids)[0], big.compute(x0, ids)[0], rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def test_gradient_memory_cap_from_environment_and_device(tiny_model, monkeypatch):
    from types import SimpleNamespace

    from diffattr.attribution.features import gradients

    spec = TimestepSpec(2)
    p = GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec).num_params
    monkeypatch.setattr(gradients, "MICRO_BATCH_BYTES", 4 * p * 3)
    # a CUDA device raises the cap to 1/16 of its memory, never below the CPU default
    big_gpu = SimpleNamespace(total_memory=16 * 4 * p * 5)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: big_gpu)
    assert gradients.gradient_memory(4 * p * 3, "cuda") == 4 * p * 5
    assert gradients.gradient_memory(4 * p * 7, "cuda:0") == 4 * p * 7
    assert gradients.gradient_memory(4 * p * 3, "cpu") == 4 * p * 3
    # the environment variable overrides every cap, in MiB
    monkeypatch.setenv("DIFFATTR_GRADIENT_MEMORY_MIB", str(4 * p * 10 / 2**20))
    assert gradients.gradient_memory(4 * p * 3, "cuda") == 4 * p * 10
    gc = GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec, micro_batch=64)
    assert gc.micro_batch == 10
    for bad in ("lots", "0", "-5", "nan"):
        monkeypatch.setenv("DIFFATTR_GRADIENT_MEMORY_MIB", bad)
        with pytest.raises(ConfigError, match="DIFFATTR_GRADIENT_MEMORY_MIB"):
            gradients.gradient_memory(4 * p * 3, "cpu")


@pytest.mark.parametrize("normalize", [True, False])
def test_layers_passes_of_whole_samples_and_of_timestep_chunks(tiny_model, small_set, normalize):
    x0, ids = small_set.images[:3], small_set.ids[:3].numpy()
    spec = TimestepSpec(5)

    def make(**kw):
        return GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), spec,
                                normalize=normalize, **kw)  # fmt: skip

    ref, err_ref, _ = make(strategy="vmap", micro_batch=4).compute(x0, ids)
    for pairs, sizes in ((2, [2, 2, 1] * 3), (12, [10, 5]), (None, [15])):
        gc = make(strategy="layers", micro_batch=pairs)
        got, err, _ = gc.compute(x0, ids)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        torch.testing.assert_close(err, err_ref, rtol=1e-5, atol=1e-7)
        passes = list(gc.segment_batches(x0, ids, gc.layer_pairs(x0)))
        assert [b[0].numel() for b, _ in passes] == sizes
        for (rows, *_), segments in passes:  # segments: consecutive samples, equal lengths
            assert rows.numel() % segments == 0
            assert torch.equal(rows.reshape(segments, -1), rows.reshape(segments, -1)[:, :1]
                               .expand(segments, rows.numel() // segments))  # fmt: skip
    assert make(strategy="layers").layer_pass_pairs is None  # chosen on the first pass
    auto = make(strategy="layers")
    assert 1 <= auto.layer_pairs(x0) <= gradients_module().AUTO_MAX_PAIRS


def gradients_module():
    from diffattr.attribution.features import gradients

    return gradients


@pytest.mark.parametrize("normalize", [True, False])
def test_layers_names_the_sample_with_a_non_finite_gradient(tiny_model, small_set, normalize):
    x0, ids = small_set.images[:3].clone(), small_set.ids[:3].numpy()
    x0[1, 0, 2, 2] = float("nan")
    gc = GradientComputer(tiny_model, make_measure("das"), NoiseSchedule(), TimestepSpec(2),
                          normalize=normalize, strategy="layers")  # fmt: skip
    with pytest.raises(NumericalError, match=f"sample id {int(ids[1])}"):
        gc.compute(x0, ids)


@pytest.mark.parametrize("strategy", ["layers", "vmap", "backward"])
def test_output_buffer_reused_across_batches(tiny_model, small_set, strategy):
    """``compute(out=buffer)`` writes ḡ into the buffer (stale contents from a previous
    batch never leak into the sums) and gives what a fresh output gives."""
    gc = GradientComputer(
        tiny_model, make_measure("das"), NoiseSchedule(), TimestepSpec(3), strategy=strategy
    )
    x0, ids = small_set.images[:4], small_set.ids[:4].numpy()
    fresh, err, _ = gc.compute(x0, ids)
    buffer = torch.full((5 * gc.dim,), float("nan"))
    gc.compute(x0[:1], ids[:1], out=buffer)  # leaves one batch's rows behind
    got, err2, _ = gc.compute(x0, ids, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and got.shape == (4, gc.dim)
    torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-6 * float(fresh.abs().max()))
    torch.testing.assert_close(err2, err)
    with pytest.raises(ConfigError, match="cannot hold 6"):
        gc.compute(small_set.images[:6], small_set.ids[:6].numpy(), out=buffer)


@pytest.mark.parametrize("timesteps", [2, 5])
def test_parameter_the_pass_never_reaches_is_zero(tiny_model, small_set, timesteps):
    """A selected layer the forward pass never calls has a zero gradient, also when whole
    samples' rows are written rather than accumulated (no zeroing first) over a stale buffer;
    5 timesteps in passes of 2 pairs exercise the accumulating path."""
    import copy

    model = copy.deepcopy(tiny_model)
    model.spare = torch.nn.Linear(3, 2)  # never called by forward
    gc = GradientComputer(
        model, make_measure("das"), NoiseSchedule(), TimestepSpec(timesteps), strategy="layers",
        micro_batch=None if timesteps == 2 else 2,
    )  # fmt: skip
    x0, ids = small_set.images[:2], small_set.ids[:2].numpy()
    g, _, _ = gc.compute(x0, ids, out=torch.full((2 * gc.dim,), float("nan")))
    assert torch.isfinite(g).all()
    start = gc._offsets["spare.weight"]
    assert torch.count_nonzero(g[:, start : start + 8]) == 0
    ref = GradientComputer(
        tiny_model, make_measure("das"), NoiseSchedule(), TimestepSpec(timesteps)
    ).compute(x0, ids)[0]
    names = list(gc.params)
    keep = torch.cat([torch.arange(gc._offsets[n], gc._offsets[n] + gc.out_dims[n])
                      for n in names if not n.startswith("spare.")])  # fmt: skip
    torch.testing.assert_close(g[:, keep], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
