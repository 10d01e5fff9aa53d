"""Samplers (docs/objective.md §Samplers, §Guidance) on closed-form velocity fields, plus the evaluation helpers.

Data x0 ~ N(mu_y, diag(s^2)) per class; for the path x_t = alpha x0 + sigma eps the exact velocity is
v = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t], with V = alpha^2 s^2 + sigma^2,
E[x0 | x_t] = mu + alpha s^2 / V (x_t - alpha mu) and E[eps | x_t] = sigma / V (x_t - alpha mu).
Every sampler step is then affine in x per dimension, so the exact mean and variance of the discretised
sampler's output follow from a scalar recursion (`_discrete_moments`): the gap between those and the data
moments is the discretisation bias, and sample moments must match them within a few standard errors.
"""

import math
import os

import numpy as np
import pytest
import torch

from repa_fast import sample as S
from repa_fast.sample import (
    class_balanced_labels,
    decode_to_uint8,
    euler_maruyama_sampler,
    euler_sampler,
    save_npz,
    shard_bounds,
)

MU = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
STD = torch.tensor([0.6, 1.0, 1.5], dtype=torch.float64)


def _coefficients(t, path_type):
    """alpha, sigma, d_alpha, d_sigma as tensors shaped like t (docs/objective.md §Interpolants)."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    c, s = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
    return c, s, -math.pi / 2 * s, math.pi / 2 * c


class GaussianFlow:
    """Exact velocity of N(means[y], diag(std^2)) data; records (t, batch size, labels, dtypes, kwargs) per call."""

    def __init__(self, means, std=STD, path_type="linear", num_classes=None, as_tuple=True):
        self.means, self.std, self.path_type, self.as_tuple = means, std, path_type, as_tuple
        if num_classes is not None:
            self.num_classes = num_classes
        self.calls = []

    def __call__(self, x, t, y):
        assert bool((t == t[0]).all()), "one time value per call"
        t0 = float(t[0])
        self.calls.append(
            dict(t=t0, n=x.shape[0], y=y.clone() if len(y) <= 256 else None, x_dtype=x.dtype, t_dtype=t.dtype)
        )
        a, b, da, db = (float(c) for c in _coefficients(torch.tensor(t0, dtype=torch.float64), self.path_type))
        mu = self.means[y] if self.means.shape[0] > 1 else self.means[0]  # (B, D) or (D,)
        q = self.std**2
        gain = (da * a * q + db * b) / (a * a * q + b * b)  # (D,): v = d_alpha mu + gain (x - alpha mu)
        v = (da * mu + gain * (x.double() - a * mu)).to(x.dtype)
        return (v, ["zs"]) if self.as_tuple else v


def _one_class_flow(path_type):
    return GaussianFlow(MU[None], path_type=path_type)


def _discrete_moments(kind, num_steps, path_type, heun=False):
    """Exact per-dimension output mean/variance of the discretised sampler for N(0, I) input (float64)."""
    mu, s2 = MU.tolist(), (STD**2).tolist()

    def affine_v(t, m, q):  # velocity = P x + Q at time t for data N(m, q)
        a, b, da, db = (float(c) for c in _coefficients(torch.tensor(t, dtype=torch.float64), path_type))
        p = (da * a * q + db * b) / (a * a * q + b * b)
        return p, da * m - p * a * m

    out = []
    for m, q in zip(mu, s2):
        mean, var = 0.0, 1.0
        if kind == "ode":
            ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        else:
            ts = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
        for i in range(num_steps):
            t, tn = ts[i], ts[i + 1]
            dt = tn - t
            p, c0 = affine_v(t, m, q)
            if kind == "ode":
                gain, shift, noise = 1 + dt * p, dt * c0, 0.0
                if heun and i < num_steps - 1:
                    pn, cn = affine_v(tn, m, q)  # Heun: x' = x + dt/2 (v(x, t) + v(x + dt v(x, t), t_next))
                    gain = 1 + dt / 2 * (p + pn * (1 + dt * p))
                    shift = dt / 2 * (c0 + pn * dt * c0 + cn)
            else:  # SDE: drift = v - 0.5 (2t) score, score affine in x through the velocity (§Samplers)
                a, b, da, db = (float(c) for c in _coefficients(torch.tensor(t, dtype=torch.float64), path_type))
                ratio = a / da
                sv = b * b - ratio * db * b
                s1, s0 = (ratio * p - 1) / sv, ratio * c0 / sv  # score = s1 x + s0
                gain, shift = 1 + dt * (p - t * s1), dt * (c0 - t * s0)
                noise = 2 * t * abs(dt) if i < num_steps - 1 else 0.0
            mean, var = gain * mean + shift, gain * gain * var + noise
        out.append((mean, var))
    return torch.tensor(out, dtype=torch.float64).T  # (2, D): means, variances


# SDE: N model calls; the reference's deterministic last step from t = 0.04 costs most of the SDE bias.
GAUSSIAN_CASES = [  # kind, num_steps, heun, path, bound on |relative variance bias| of the discrete sampler
    ("ode", 200, False, "linear", 0.02),  # measured: 1.4% variance, 0 mean (see _discrete_moments)
    ("ode", 200, False, "cosine", 0.02),  # 0.2% variance, 0.8 % of s on the mean
    ("ode", 40, True, "linear", 0.005),  # 0.14%
    ("ode", 40, True, "cosine", 0.005),  # 0.21%
    ("sde", 100, False, "linear", 0.03),  # 2.1% (0.04 -> 0 last step included)
    ("sde", 100, False, "cosine", 0.03),  # 1.4%, 1.7% of s on the mean
]


@pytest.fixture
def one_thread():
    """Elementwise float64 work on ~1e5 rows gains nothing from intra-op threads, and on a shared 2-core box
    their spin-waits made these tests 10x slower (measured 3 s -> 20 s per case); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind,num_steps,heun,path_type,bias_bound", GAUSSIAN_CASES)
def test_gaussian_moments(kind, num_steps, heun, path_type, bias_bound):
    n = 100_000
    gen = torch.Generator().manual_seed(1234)
    x1 = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    y = torch.zeros(n, dtype=torch.long)
    model = _one_class_flow(path_type)
    if kind == "ode":
        out = euler_sampler(model, x1, y, num_steps=num_steps, heun=heun, path_type=path_type)
    else:
        out = euler_maruyama_sampler(model, x1, y, num_steps=num_steps, path_type=path_type, generator=gen)
    assert out.dtype == torch.float64 and out.shape == x1.shape
    m_hat, v_hat = out.mean(0), out.var(0)
    m_disc, v_disc = _discrete_moments(kind, num_steps, path_type, heun)
    # The discretisation bias of this grid is small (documented bound), and it is all the test forgives.
    bias_m, bias_v = m_disc - MU, v_disc - STD**2
    assert (bias_v.abs() / STD**2).max() <= bias_bound, bias_v / STD**2
    assert (bias_m.abs() / STD).max() <= bias_bound, bias_m / STD
    se_m, se_v = (v_disc / n).sqrt(), v_disc * math.sqrt(2 / (n - 1))  # Gaussian output: var of s^2 is 2 s^4/(n-1)
    assert (4 * se_v / STD**2).max() < 0.02  # a 2% variance error beyond the bias fails (power)
    # Sample moments agree with the exact moments of the discrete sampler within 4 standard errors ...
    assert ((m_hat - m_disc).abs() <= 4 * se_m).all(), (m_hat - m_disc) / se_m
    assert ((v_hat - v_disc).abs() <= 4 * se_v).all(), (v_hat - v_disc) / se_v
    # ... and the data moments within 4 standard errors plus that bias.
    assert ((m_hat - MU).abs() <= 4 * se_m + bias_m.abs()).all()
    assert ((v_hat - STD**2).abs() <= 4 * se_v + bias_v.abs()).all()


@pytest.mark.usefixtures("one_thread")
def test_sde_wrong_path_is_detected():
    """Power check: scoring a cosine-path model as if it were linear moves the moments far outside the tolerance."""
    n = 20_000
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    y = torch.zeros(n, dtype=torch.long)
    out = euler_maruyama_sampler(_one_class_flow("cosine"), x1, y, num_steps=50, path_type="linear", generator=gen)
    m_disc, v_disc = _discrete_moments("sde", 50, "cosine")
    se_v = v_disc * math.sqrt(2 / (n - 1))
    assert ((out.var(0) - v_disc).abs() > 10 * se_v).all()  # measured: 53-59 standard errors


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance and the guidance interval
# ---------------------------------------------------------------------------------------------------------
K = 4  # classes; label K is the null class of the closed-form model
CLASS_MEANS = torch.tensor([[2.0, 0.0, -1.0], [-1.5, 1.0, 0.5], [0.3, -2.0, 1.2], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def _class_flow(**kw):
    return GaussianFlow(CLASS_MEANS.double(), num_classes=K, **kw)


def _inputs(b=6, dtype=torch.float64):
    x = torch.randn(b, 3, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, K, (b,))


def _direct_v(x, t, y):
    """Velocity from a fresh model (no instrumentation), float64, at one time for all rows."""
    return _class_flow(as_tuple=False)(x, torch.full((x.shape[0],), t, dtype=torch.float64), y)


def _spec_loop(kind, model, x, y, num_steps, cfg, low, high, null, heun=False, gen=None):
    """docs/objective.md §Samplers written out naively (labels and inputs concatenated at every evaluation; linear
    path)."""
    if kind == "ode":
        ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    else:
        ts = torch.linspace(1, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]

    def drift(x, t, guided):
        xin = torch.cat([x, x]) if guided else x
        yin = torch.cat([y, torch.full_like(y, null)]) if guided else y
        v = model(xin, torch.full((xin.shape[0],), t, dtype=torch.float64), yin)[0]
        d = v if kind == "ode" else v - 0.5 * (2 * t) * ((-(1 - t) * v - xin) / t)  # s = (-(1-t) v - x) / t
        if guided:
            dc, du = d.chunk(2)
            d = du + cfg * (dc - du)
        return d

    x = x.double()
    for i in range(num_steps):
        t, tn = ts[i], ts[i + 1]
        guided = cfg > 1 and low <= t <= high
        noise = torch.randn(x.shape, generator=gen, dtype=torch.float64) if kind == "sde" and i < num_steps - 1 else 0
        d = drift(x, t, guided)
        x_new = x + (tn - t) * d
        if heun and i < num_steps - 1:
            x_new = x + (tn - t) * (0.5 * d + 0.5 * drift(x_new, tn, guided))
        x = x_new + math.sqrt(2 * t) * math.sqrt(abs(tn - t)) * noise
    return x


@pytest.mark.parametrize("kind,heun", [("ode", False), ("ode", True), ("sde", False)])
def test_matches_spec_loop_with_cfg_interval(kind, heun):
    x, y = _inputs(b=5)
    cfg, low, high, steps = 2.5, 0.2, 0.7, 12
    if kind == "ode":
        out = euler_sampler(_class_flow(), x, y, steps, heun, cfg, low, high)
        ref = _spec_loop(kind, _class_flow(), x, y, steps, cfg, low, high, null=K, heun=heun)
    else:
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        out = euler_maruyama_sampler(_class_flow(), x, y, steps, False, cfg, low, high, generator=g1)
        ref = _spec_loop(kind, _class_flow(), x, y, steps, cfg, low, high, null=K, gen=g2)
    plain = (euler_sampler if kind == "ode" else euler_maruyama_sampler)(_class_flow(), x, y, steps, heun)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out - plain).abs().max() > 1e-2  # guidance changed the result: the comparison has teeth


@pytest.mark.parametrize("kind", ["ode", "heun", "sde"])
def test_cfg_scale_one_is_no_cfg(kind):
    x, y = _inputs()
    m1, m2 = _class_flow(), _class_flow()
    if kind == "sde":
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = euler_maruyama_sampler(m1, x, y, 7, cfg_scale=1.0, guidance_low=0.2, generator=g1)
        b = euler_maruyama_sampler(m2, x, y, 7, generator=g2)
    else:
        a = euler_sampler(m1, x, y, 7, heun=kind == "heun", cfg_scale=1.0, guidance_high=0.5)
        b = euler_sampler(m2, x, y, 7, heun=kind == "heun")
    assert torch.equal(a, b)
    assert all(c["n"] == x.shape[0] and bool((c["y"] == y).all()) for c in m1.calls)  # never doubled, no null label
    # And it is the conditional flow: a hand-written Euler loop on the conditional velocity agrees.
    if kind == "ode":
        ref, ts = x.clone(), torch.linspace(1, 0, 8, dtype=torch.float64).tolist()
        for t, tn in zip(ts[:-1], ts[1:]):
            ref = ref + (tn - t) * _direct_v(ref, t, y)
        torch.testing.assert_close(a, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("w", [1.5, 4.0])
def test_cfg_one_step_is_du_plus_w_dc_minus_du(w):
    x, y = _inputs()
    v_c, v_u = _direct_v(x, 1.0, y), _direct_v(x, 1.0, torch.full_like(y, K))
    # ODE, one step from t = 1 to 0: x - (v_u + w (v_c - v_u)).
    out = euler_sampler(_class_flow(), x, y, num_steps=1, cfg_scale=w)
    torch.testing.assert_close(out, x - (v_u + w * (v_c - v_u)), rtol=1e-14, atol=1e-14)
    # SDE with one step is the deterministic step 1 -> 0; at t = 1 the linear score is -x so d = v + x.
    out = euler_maruyama_sampler(_class_flow(), x, y, num_steps=1, cfg_scale=w)
    d_c, d_u = v_c + x, v_u + x
    torch.testing.assert_close(out, x - (d_u + w * (d_c - d_u)), rtol=1e-14, atol=1e-14)


def _trace(model):
    """[(t, doubled?)] per call; doubled calls carry [y; null] labels."""
    out = []
    for c in model.calls:
        doubled = c["n"] == 12
        if doubled:
            assert bool((c["y"][6:] == K).all()) and bool((c["y"][:6] < K).all())
        out.append((c["t"], doubled))
    return out


def test_guidance_interval_ode_exact_boundaries():
    # N = 8: the float64 grid is exact in binary (1, 0.875, ..., 0.125, 0), so limits can equal grid points.
    x, y = _inputs()
    m = _class_flow()
    euler_sampler(m, x, y, num_steps=8, cfg_scale=3.0, guidance_low=0.25, guidance_high=0.75)
    ts = [1 - k / 8 for k in range(8)]
    assert _trace(m) == [(t, 0.25 <= t <= 0.75) for t in ts]
    assert [t for t, d in _trace(m) if d] == [0.75, 0.625, 0.5, 0.375, 0.25]  # both limits inclusive
    # Heun: the second evaluation at t_next follows the decision taken at t_cur (samplers.py).
    m = _class_flow()
    euler_sampler(m, x, y, num_steps=8, heun=True, cfg_scale=3.0, guidance_low=0.25, guidance_high=0.75)
    expected = []
    for k in range(8):
        expected.append((ts[k], 0.25 <= ts[k] <= 0.75))
        if k < 7:
            expected.append((ts[k] - 1 / 8, 0.25 <= ts[k] <= 0.75))
    assert _trace(m) == expected
    assert [t for t, d in _trace(m) if d] == [0.75, 0.625, 0.625, 0.5, 0.5, 0.375, 0.375, 0.25, 0.25, 0.125]


def test_guidance_interval_sde_exact_boundaries():
    x, y = _inputs()
    grid = torch.linspace(1.0, 0.04, 25, dtype=torch.float64).tolist()  # SDE grid: 1, 0.96, ..., 0.04
    lo, hi = grid[20], grid[7]  # limits equal to grid points (0.2, 0.72 up to rounding)
    m = _class_flow()
    euler_maruyama_sampler(m, x, y, num_steps=25, cfg_scale=2.0, guidance_low=lo, guidance_high=hi)
    trace = _trace(m)
    assert [t for t, _ in trace] == grid  # N calls, at the grid points, last one at 0.04
    assert [k for k, (_, d) in enumerate(trace) if d] == list(range(7, 21))
    # Moving each limit one ulp inside the interval drops exactly the boundary point.
    m = _class_flow()
    lo_in, hi_in = math.nextafter(lo, 1), math.nextafter(hi, 0)
    euler_maruyama_sampler(m, x, y, 25, cfg_scale=2.0, guidance_low=lo_in, guidance_high=hi_in)
    assert [k for k, (_, d) in enumerate(_trace(m)) if d] == list(range(8, 20))
    # Defaults [0, 1]: every step guided, including t = 1 and the last step at 0.04.
    m = _class_flow()
    euler_maruyama_sampler(m, x, y, 25, cfg_scale=2.0)
    assert all(d for _, d in _trace(m)) and len(m.calls) == 25


# ---------------------------------------------------------------------------------------------------------
# Model calls: counts, return_zs, dtypes, outputs, null label, RNG
# ---------------------------------------------------------------------------------------------------------
class ZsModule(torch.nn.Module):
    """nn.Module like the SiT: forward(x, t, y, return_zs=True) -> (v, zs); records what it was given."""

    def __init__(self, num_classes=K):
        super().__init__()
        self.flow = _class_flow(as_tuple=False)
        self.num_classes = num_classes
        self.seen = []
        self.eval()

    def forward(self, x, t, y, return_zs=True):
        self.seen.append(return_zs)
        return self.flow(x, t, y), (["projector ran"] if return_zs else [])


@pytest.mark.parametrize("steps", [1, 2, 9])
def test_number_of_model_calls(steps):
    x, y = _inputs()
    for sampler, kw, expected in [
        (euler_sampler, {}, steps),
        (euler_sampler, {"heun": True}, 2 * steps - 1),
        (euler_maruyama_sampler, {}, steps),
        (euler_sampler, {"heun": True, "cfg_scale": 2.0}, 2 * steps - 1),  # CFG doubles the batch, not the calls
        (euler_maruyama_sampler, {"cfg_scale": 2.0}, steps),
    ]:
        m = _class_flow()
        sampler(m, x, y, num_steps=steps, **kw)
        assert len(m.calls) == expected, (sampler.__name__, kw)


def test_return_zs_false_when_accepted_and_inspected_once(monkeypatch):
    x, y = _inputs()
    m = ZsModule()
    out = euler_sampler(m, x, y, num_steps=4, heun=True, cfg_scale=2.0)
    assert m.seen == [False] * 7
    torch.testing.assert_close(out, euler_sampler(_class_flow(), x, y, num_steps=4, heun=True, cfg_scale=2.0))
    m = ZsModule()
    euler_maruyama_sampler(m, x, y, num_steps=3)
    assert m.seen == [False] * 3
    # A callable without the keyword is called without it (it would raise TypeError otherwise) ...
    euler_sampler(_class_flow(), x, y, num_steps=3)
    assert not S.accepts_return_zs(lambda x, t, y, **kw: x)  # ... and **kwargs alone does not count
    assert S.accepts_return_zs(torch.compile(ZsModule()))  # unwrapped through torch.compile's _orig_mod
    # Introspection happens once per sampler call, not per step.
    calls = []
    real = S.inspect.signature
    monkeypatch.setattr(S.inspect, "signature", lambda fn: calls.append(fn) or real(fn))
    for steps in (2, 12):
        calls.clear()
        euler_maruyama_sampler(ZsModule(), x, y, num_steps=steps, cfg_scale=1.5)
        assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_model_called_in_latent_dtype_state_in_float64(dtype):
    x, y = _inputs(dtype=dtype)
    for sampler in (euler_sampler, euler_maruyama_sampler):
        m = _class_flow()
        out = sampler(m, x, y, num_steps=5, cfg_scale=1.5)
        assert out.dtype == torch.float64
        assert {(c["x_dtype"], c["t_dtype"]) for c in m.calls} == {(dtype, dtype)}
        ode = sampler is euler_sampler
        grid = torch.linspace(1, 0 if ode else 0.04, 6 if ode else 5, dtype=torch.float64)[:5].tolist()
        # t is the float64 grid rounded to the model dtype, as the reference casts time_input.
        expected = [float(torch.tensor(t, dtype=torch.float64).to(dtype)) for t in grid]
        assert [c["t"] for c in m.calls] == expected


def test_train_mode_warns():
    x, y = _inputs()
    with pytest.warns(UserWarning, match="model.eval"):
        euler_sampler(ZsModule().train(), x, y, num_steps=2)


def test_tensor_or_tuple_output():
    x, y = _inputs()
    a = euler_sampler(_class_flow(as_tuple=True), x, y, num_steps=6, cfg_scale=2.0)
    b = euler_sampler(_class_flow(as_tuple=False), x, y, num_steps=6, cfg_scale=2.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="velocity of shape"):
        euler_sampler(lambda x, t, y: x[:, :2], x, y, num_steps=2)


def test_null_label_from_model_override_and_legacy():
    x, y = _inputs()

    def nulls(model, **kw):
        euler_sampler(model, x, y, num_steps=2, cfg_scale=2.0, **kw)
        return {int(v) for c in model.calls for v in c["y"][6:]}

    assert nulls(_class_flow()) == {K}  # the model's num_classes, not the reference's hard-coded 1000
    assert nulls(_class_flow(), null_class=2) == {2}
    legacy = GaussianFlow(torch.zeros(1001, 3, dtype=torch.float64))  # no num_classes attribute
    assert nulls(legacy) == {1000}
    m = ZsModule(num_classes=K)
    euler_sampler(m, x, y, num_steps=2, cfg_scale=2.0)
    assert {int(v) for c in m.flow.calls for v in c["y"][6:]} == {K}


def test_sde_generator_reproducible_and_global_rng_like_reference():
    x, y = _inputs()
    run = lambda g: euler_maruyama_sampler(_class_flow(), x, y, num_steps=6, generator=g)
    a, b = run(torch.Generator().manual_seed(11)), run(torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
    assert (a - run(torch.Generator().manual_seed(12))).abs().max() > 1e-3
    # Without a generator the noise is torch.randn_like on the float64 state (global RNG), as the reference.
    torch.manual_seed(4)
    c = run(None)
    assert torch.equal(c, run(torch.Generator().manual_seed(4)))


def test_bad_arguments_raise_clear_errors():
    x, y = _inputs()
    m = _class_flow()
    cases = [
        (dict(cfg_scale=0.5), "cfg_scale"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
        (dict(cfg_scale=2.0, guidance_low=0.8, guidance_high=0.2), "empty"),
        (dict(num_steps=0), "num_steps"),
        (dict(path_type="vp"), "path_type"),
    ]
    for kw, msg in cases:
        for sampler in (euler_sampler, euler_maruyama_sampler):
            with pytest.raises(ValueError, match=msg):
                sampler(m, x, y, **kw)
    with pytest.raises(ValueError, match="heun"):
        euler_maruyama_sampler(m, x, y, heun=True)
    with pytest.raises(ValueError, match=r"y: expected integer class labels of shape \(6,\)"):
        euler_sampler(m, x, y[:5])
    with pytest.raises(ValueError, match="y: expected integer"):
        euler_sampler(m, x, y.double())
    assert m.calls == []


# ---------------------------------------------------------------------------------------------------------
# Evaluation helpers
# ---------------------------------------------------------------------------------------------------------
def test_decode_to_uint8_rounds_or_truncates():
    # Pixel values 255 (x + 1) / 2 chosen around integers: 127.5 (x = 0, exact), 3.4, 200.7, clamped ends.
    px = torch.tensor([0.0, 3.4, 200.7, 254.6, -10.0, 300.0, 127.5], dtype=torch.float64)
    x = (px / 255 * 2 - 1).float().view(1, 1, 1, -1).expand(1, 3, 2, -1).contiguous()  # (1, 3, 2, 7)
    rounded = decode_to_uint8(x)
    truncated = decode_to_uint8(x, rounding="truncate")
    assert rounded.shape == (1, 2, 7, 3) and rounded.dtype == torch.uint8
    assert rounded[0, 0, :, 0].tolist() == [0, 3, 201, 255, 0, 255, 128]  # 127.5: ties to even
    assert truncated[0, 0, :, 0].tolist() == [0, 3, 200, 254, 0, 255, 127]
    # Truncation is the reference expression (generate.py), layout NCHW -> NHWC, on random images.
    img = torch.rand(2, 3, 5, 4) * 2.4 - 1.2
    ref = torch.clamp(255.0 * ((img + 1) / 2), 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(decode_to_uint8(img, rounding="truncate"), ref)
    diff = decode_to_uint8(img).int() - ref.int()
    assert set(diff.unique().tolist()) == {0, 1}  # rounding moves some pixels up by one, never down
    with pytest.raises(ValueError, match="NaN"):
        decode_to_uint8(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="rounding"):
        decode_to_uint8(img, rounding="floor")


def test_class_balanced_labels():
    n, c = 50_000, 1000
    shards = [class_balanced_labels(n, c, rank=r, world_size=7) for r in range(7)]
    assert [len(s) for s in shards] == [7143] * 6 + [7142]  # 50000 = 7 * 7142 + 6: first ranks take one more
    allv = torch.cat(shards)
    assert torch.equal(allv, torch.arange(n) % c)  # ranks tile the global sequence in order
    assert torch.equal(torch.bincount(allv, minlength=c), torch.full((c,), 50))
    counts = torch.bincount(class_balanced_labels(1003, 10), minlength=10)
    assert counts.tolist() == [101, 101, 101] + [100] * 7
    assert shard_bounds(10, 0, 3) == (0, 4) and shard_bounds(10, 2, 3) == (7, 10)
    with pytest.raises(ValueError, match="rank"):
        class_balanced_labels(10, 10, rank=3, world_size=3)


def test_save_npz_round_trip_atomic(tmp_path, monkeypatch):
    imgs = torch.randint(0, 256, (5, 8, 6, 3), dtype=torch.uint8)
    path = tmp_path / "samples.npz"
    assert save_npz(path, imgs) == str(path)
    with np.load(path) as f:
        assert list(f.keys()) == ["arr_0"]
        assert f["arr_0"].shape == (5, 8, 6, 3) and f["arr_0"].dtype == np.uint8
        assert np.array_equal(f["arr_0"], imgs.numpy())
    save_npz(tmp_path / "no_suffix", imgs.numpy())  # np.savez would have written "no_suffix.npz"
    assert os.path.exists(tmp_path / "no_suffix")
    # A failed write leaves the previous file intact and no temporary file behind.
    monkeypatch.setattr(S.np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_npz(path, imgs[:1])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["no_suffix", "samples.npz"]
    with np.load(path) as f:
        assert f["arr_0"].shape[0] == 5
    for bad in (imgs.float(), imgs[..., :2], imgs[0]):
        with pytest.raises(ValueError, match="samples.npz.*uint8 \\(N, H, W, 3\\)"):
            save_npz(path, bad)
