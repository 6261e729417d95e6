"""ddpm.py's math against independent computations: published reference values, closed
forms, Bayes' rule done by hand, torch.distributions, and exact answers on toy data."""
import math

import numpy as np
import pytest
import torch

import ddpm

torch.set_num_threads(2)
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 pixel values in [-1, 1]


# --- schedules -------------------------------------------------------------------------

def test_linear_schedule_reference_values():
    s = ddpm.make_schedule("linear", 1000)
    assert s["betas"][0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s["betas"][-1].item() == pytest.approx(0.02, rel=1e-6)
    # Values of DESIGN.md (Ho et al. 2020 setting).
    assert s["post_var"][487].item() == pytest.approx(0.00979, abs=5e-6)
    assert s["post_var"][999].item() == pytest.approx(0.02, abs=5e-6)
    assert s["alpha_bar"][999].item() == pytest.approx(4.036e-5, rel=1e-3)
    # alpha_bar against a float64 product written out step by step.
    ab, prod = s["alpha_bar"].double(), 1.0
    for t, beta in enumerate(np.linspace(1e-4, 0.02, 1000)):
        prod *= 1 - beta
        if t in (0, 10, 500, 999):
            assert ab[t].item() == pytest.approx(prod, rel=1e-5)


@pytest.mark.parametrize("T", [50, 200, 1000, 4000])
def test_linear_schedule_scaled_ends_in_noise(T):
    s = ddpm.make_schedule("linear", T)
    assert s["betas"][0].item() == pytest.approx(1e-4 * 1000 / T, rel=1e-5)
    assert s["betas"][-1].item() == pytest.approx(min(0.02 * 1000 / T, 0.999), rel=1e-5)
    assert s["sqrt_alpha_bar"][-1].item() < 0.01  # x_{T-1} is noise whatever T


def test_cosine_schedule_reference_values():
    T = 1000
    betas = ddpm.cosine_betas(T)
    assert betas[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert (betas >= 0.999).sum().item() == 1 and betas[-1].item() == pytest.approx(0.999)
    # Before the clip, alpha_bar_t = f(t+1)/f(0) (Nichol & Dhariwal eq. 17), computed directly.
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = ddpm.make_schedule("cosine", T)["alpha_bar"]
    for t in (0, 100, 500, 900, 998):
        assert ab[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-4)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule"):
        ddpm.make_schedule("sigmoid", 10)


# --- forward process and posterior --------------------------------------------------------

def test_q_sample_moments():
    s = ddpm.make_schedule("cosine", 100)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for step in (0, 30, 99):
        t = torch.full((20000,), step)
        xt = ddpm.q_sample(s, x0, t, torch.randn_like(x0))
        ab = s["alpha_bar"][step].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.05, abs=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_bayes_rule(schedule):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): multiply the two Gaussians
    (precisions add, precision-weighted means add), in float64, by hand."""
    T = 100
    s = ddpm.make_schedule(schedule, T)
    betas = ddpm.linear_betas(T) if schedule == "linear" else ddpm.cosine_betas(T)
    x0, xt = torch.tensor([[[[0.3]]], [[[-0.8]]]]), torch.tensor([[[[1.2]]], [[[0.1]]]])
    for step in (1, 2, 50, 99):
        ab_prev = float(torch.prod(1 - betas[:step]))
        beta = float(betas[step])
        prec = 1 / (1 - ab_prev) + (1 - beta) / beta
        for i in range(2):
            mean = (math.sqrt(ab_prev) * x0[i].item() / (1 - ab_prev) + math.sqrt(1 - beta) * xt[i].item() / beta) / prec
            m, v, lv = ddpm.q_posterior(s, x0, xt, torch.tensor([step, step]))
            assert m[i].item() == pytest.approx(mean, rel=1e-4, abs=1e-6)
            assert v[i].item() == pytest.approx(1 / prec, rel=1e-4)
            assert lv[i].item() == pytest.approx(math.log(1 / prec), abs=1e-4)


def test_posterior_at_t0_returns_x0():
    s = ddpm.make_schedule("linear", 1000)
    x0, xt = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    m, v, lv = ddpm.q_posterior(s, x0, xt, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(m, x0, atol=1e-6) and v.abs().max() == 0
    assert lv[0].item() == pytest.approx(math.log(s["post_var"][1].item()))  # clipped log variance


# --- parameterisations ------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_parameterisations_round_trip_and_loss_weights(pred):
    s = ddpm.make_schedule("cosine", 1000)
    torch.manual_seed(0)
    x0, eps = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    xt = ddpm.q_sample(s, x0, t, eps)
    ab = s["alpha_bar"][t].view(-1, 1, 1, 1).double()
    # The exact target, written from its definition (v of Salimans & Ho 2022).
    exact = {"eps": eps, "x0": x0, "v": (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()}[pred]
    x0_back, eps_back = ddpm.predict_x0_eps(s, xt, t, exact, pred)
    assert torch.allclose(x0_back, x0, atol=2e-3) and torch.allclose(eps_back, eps, atol=2e-3)
    # The weighted target MSE equals the eps-MSE of the converted prediction (Ho eq. 14).
    target, weight = ddpm.training_target_and_weight(s, x0, eps, t, pred)
    assert torch.allclose(target, exact, atol=1e-6)
    out = exact + 0.01 * torch.randn_like(exact)
    _, eps_hat = ddpm.predict_x0_eps(s, xt, t, out, pred)
    lhs = (weight * (out - target) ** 2).mean(dim=(1, 2, 3))
    rhs = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(lhs, rhs, rtol=2e-2, atol=1e-7)


def test_clipping_keeps_eps_consistent():
    s = ddpm.make_schedule("linear", 1000)
    xt = torch.full((1, 1, 1, 1), 3.0)
    t = torch.tensor([10])
    x0, eps = ddpm.predict_x0_eps(s, xt, t, torch.zeros_like(xt), "eps", clip=True)
    assert x0.item() == 1.0  # 3/sqrt(ab) clipped into the data range
    ab = s["alpha_bar"][10].item()
    assert eps.item() == pytest.approx((3.0 - math.sqrt(ab)) / math.sqrt(1 - ab), rel=1e-4)


# --- DDIM ------------------------------------------------------------------------------------

def test_ddim_reference_variances():
    ab = ddpm.make_schedule("linear", 1000)["alpha_bar"].double()
    assert ddpm.ddim_sigma2(ab[420], ab[400], 1.0).item() == pytest.approx(0.14771, abs=5e-5)
    assert ddpm.ddim_sigma2(ab[980], ab[960], 1.0).item() == pytest.approx(0.32460, abs=5e-5)
    assert ddpm.ddim_sigma2(ab[420], ab[400], 0.0).item() == 0.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_eta1_full_grid_is_ddpm_variance(schedule):
    s = ddpm.make_schedule(schedule, 1000)
    betas = ddpm.linear_betas(1000) if schedule == "linear" else ddpm.cosine_betas(1000)
    ab = torch.cumprod(1 - betas, dim=0)  # float64 throughout
    grid = ddpm.ddim_timesteps(1000, 1000)
    assert grid == list(range(999, -1, -1))
    sig = torch.stack([ddpm.ddim_sigma2(ab[t], ab[t - 1], 1.0) for t in range(1, 1000)])
    assert torch.allclose(sig.float(), s["post_var"][1:], rtol=1e-4)


def test_ddim_trailing_grid():
    assert ddpm.ddim_timesteps(1000, 50)[:3] == [999, 979, 959]
    assert ddpm.ddim_timesteps(1000, 50)[-1] == 19
    assert ddpm.ddim_timesteps(100, 1) == [99]
    for steps in (1, 7, 50, 333):
        grid = ddpm.ddim_timesteps(1000, steps)
        assert len(grid) == steps and grid[0] == 999 and all(a > b for a, b in zip(grid, grid[1:]))
    with pytest.raises(ValueError):
        ddpm.ddim_timesteps(100, 101)


# --- samplers with an exact denoiser ---------------------------------------------------------------

def bayes_denoiser(sched, values, probs):
    """The exact E[x_0 | x_t] for data whose pixels are i.i.d. on `values` with `probs`:
    posterior weights ∝ probs_k N(x_t; sqrt(ab) v_k, 1 - ab). Returned as an x0-prediction."""
    logp, c = torch.log(probs).float(), values.float()

    def model_fn(x_t, t):
        ab = sched["alpha_bar"][t].view(-1, 1, 1, 1, 1)
        logw = logp - (x_t.unsqueeze(-1) - ab.sqrt() * c) ** 2 / (2 * (1 - ab))
        return (torch.softmax(logw, dim=-1) * c).sum(-1)

    return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "ddim-eta1"])
def test_samplers_reproduce_a_known_distribution(sampler):
    values, probs = torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.5, 0.3, 0.2])
    s = ddpm.make_schedule("cosine", 200)
    fn = bayes_denoiser(s, values, probs)
    gen = torch.Generator().manual_seed(0)
    shape = (3000, 1, 1, 1)
    if sampler == "ddpm":
        x = ddpm.ddpm_sample(fn, s, shape, "x0", generator=gen)
    else:
        x = ddpm.ddim_sample(fn, s, shape, "x0", steps=50, eta=1.0 if sampler == "ddim-eta1" else 0.0, generator=gen)
    x = x.flatten()
    nearest = (x[:, None] - values[None]).abs().argmin(1)
    assert (x - values[nearest]).abs().max() < 0.05  # lands on the data
    freq = torch.bincount(nearest, minlength=3).float() / len(x)
    assert torch.allclose(freq, probs, atol=0.04)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 10)])
def test_on_step_sees_every_step(sampler, steps):
    s = ddpm.make_schedule("linear", 50)
    fn = bayes_denoiser(s, torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 0.5]))
    kept = []
    x = ddpm.sample(fn, s, 2, "x0", sampler, steps=steps, generator=torch.Generator().manual_seed(0),
                    on_step=lambda x: kept.append(x.clone()))
    assert len(kept) == steps and torch.equal(kept[-1], x)
    # the callback only watches: the same generator gives the same samples without it
    again = ddpm.sample(fn, s, 2, "x0", sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, x)


# --- the bound ---------------------------------------------------------------------------------------

def test_normal_kl_against_torch_distributions():
    D = torch.distributions
    m1, m2 = torch.randn(50), torch.randn(50)
    lv1, lv2 = torch.randn(50), torch.randn(50)
    expected = D.kl_divergence(D.Normal(m1, (0.5 * lv1).exp()), D.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(ddpm.normal_kl(m1, lv1, m2, lv2), expected, atol=1e-5)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    x = LEVELS.float().view(256, 1, 1, 1)
    for mean, log_scale in ((0.1, math.log(0.3)), (-0.95, math.log(0.01)), (0.999, math.log(0.002)), (0.0, math.log(3.0))):
        logp = ddpm.discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(2 * log_scale))
        assert logp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)
        # Interior bins against torch.distributions.Normal's CDF.
        normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), math.exp(log_scale))
        xs = LEVELS[1:-1]
        expected = normal.cdf(xs + 1 / 255) - normal.cdf(xs - 1 / 255)
        got = logp[1:-1].flatten().double().exp()
        assert torch.allclose(got, expected, atol=1e-5)
    # Far in a tail the log-probability stays finite and accurate (log_ndtr, not log(0)).
    # Reference: the normal density integrated over the bin by the midpoint rule in float64.
    far = ddpm.discretized_gaussian_log_likelihood(torch.tensor(0.5), torch.tensor(-0.5), torch.tensor(2 * math.log(0.05)))
    z = torch.linspace((1 - 1 / 255) / 0.05, (1 + 1 / 255) / 0.05, 100001, dtype=torch.float64)
    log_pdf = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
    reference = torch.logsumexp(log_pdf, 0).item() + math.log((z[1] - z[0]).item())
    assert far.item() == pytest.approx(reference, rel=1e-4)  # about -200 nats


def test_bound_of_gaussian_data_matches_closed_form():
    """For x_0 ~ N(0, s^2) per pixel the optimal denoiser is linear and E_q[L_t] is closed form:
    with the posterior-mean reverse step, KL_t = coef1^2 (x_0 - E[x_0|x_t])^2 / (2 beta_tilde_t),
    whose expectation is (snr_{t-1} - snr_t) / 2 * mmse(snr_t), mmse(snr) = s^2 / (1 + snr s^2)
    (snr = ab / (1 - ab)); the prior term is a KL between Gaussians averaged over x_0."""
    sd, T = 0.2, 200
    s = ddpm.make_schedule("linear", T)
    ab = s["alpha_bar"].double()
    snr = ab / (1 - ab)

    def optimal_x0(x_t, t):  # E[x_0 | x_t] for Gaussian x_0: a linear shrinkage of x_t
        a = s["alpha_bar"][t].view(-1, 1, 1, 1)
        return a.sqrt() * sd ** 2 * x_t / (a * sd ** 2 + 1 - a)

    torch.manual_seed(0)
    x0 = sd * torch.randn(4000, 1, 2, 2)
    out = ddpm.vlb_bits_per_dim(optimal_x0, s, x0, "x0", generator=torch.Generator().manual_seed(1))
    kl_nats = sum(0.5 * (snr[t - 1] - snr[t]) * sd ** 2 / (1 + snr[t] * sd ** 2) for t in range(1, T)).item()
    a = ab[-1].item()
    prior_nats = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * sd ** 2)
    n = out["kl"].numel()
    assert out["kl"].mean().item() == pytest.approx(kl_nats / math.log(2), abs=4 * out["kl"].std().item() / n ** 0.5)
    assert out["prior"].mean().item() == pytest.approx(prior_nats / math.log(2), rel=0.05, abs=1e-6)


def test_bound_with_exact_denoiser_is_close_to_and_above_the_true_nll():
    """Discrete data: each pixel one of the 256 levels with Gaussian-shaped probabilities, so
    the true NLL is the entropy H. With the exact E[x_0 | x_t] plugged in, the bound must be
    >= H (it is a bound) and close to it. The gap that remains is the fixed-variance Gaussian
    decoder at t = 0 and the finite steps; we measured 0.68 bits/dim (cosine, T = 1000)."""
    probs = torch.exp(-LEVELS ** 2 / (2 * 0.3 ** 2))
    probs = probs / probs.sum()
    H = -(probs * torch.log2(probs)).sum().item()  # 7.30 bits
    s = ddpm.make_schedule("cosine", 1000)
    torch.manual_seed(0)
    x0 = LEVELS[torch.multinomial(probs, 256 * 4, replacement=True)].float().view(256, 1, 2, 2)
    out = ddpm.vlb_bits_per_dim(bayes_denoiser(s, LEVELS, probs), s, x0, "x0", generator=torch.Generator().manual_seed(1))
    bound, stderr = out["total"].mean().item(), out["total"].std().item() / 256 ** 0.5
    assert bound > H - 3 * stderr
    assert bound < H + 1.0
    assert out["prior"].mean().item() < 1e-3


def test_bound_of_a_bad_denoiser_is_worse():
    # Sanity of the direction: predicting x0 = 0 everywhere must cost more than the exact denoiser.
    values, probs = torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 0.5])
    s = ddpm.make_schedule("linear", 100)
    x0 = torch.tensor([-1.0, 1.0]).repeat(64).view(128, 1, 1, 1)
    good = ddpm.vlb_bits_per_dim(bayes_denoiser(s, values, probs), s, x0, "x0")["total"].mean()
    bad = ddpm.vlb_bits_per_dim(lambda x, t: torch.zeros_like(x), s, x0, "x0")["total"].mean()
    assert good >= 1.0 - 0.05 and bad > good + 1.0


# --- EMA -------------------------------------------------------------------------------------------

def test_ema_decay_warmup():
    assert ddpm.ema_decay(0, 0.9999) == 0.0
    assert ddpm.ema_decay(9, 0.9999) == pytest.approx(1 - 10 ** -0.75)
    assert ddpm.ema_decay(10 ** 8, 0.9999) == 0.9999
    decays = [ddpm.ema_decay(k, 0.9999) for k in range(0, 100000, 1000)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_ema_update_is_the_moving_average():
    p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    e = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    ddpm.ema_update(e, p, 0.9)
    assert torch.allclose(e[0], torch.tensor([0.1, 0.2])) and torch.allclose(e[1], torch.tensor([[1.2]]))
    ddpm.ema_update(e, p, 0.0)  # decay 0 (the first update) copies the parameters
    assert torch.equal(e[0], p[0]) and torch.equal(e[1], p[1])


@pytest.mark.parametrize("class_cond", [False, True])
def test_evaluate_bounds_exactly_the_first_eval_images(class_cond):
    """--eval-images 3 is the bound of test digits 0, 1, 2: the mean of their per-image bounds
    (the same noise), not of a whole batch."""
    import argparse
    torch.manual_seed(0)
    net = ddpm.build_model({"arch": "resnet", "channels": 8, "channel_mult": "1,2", "num_blocks": 1,
                            "attention": False, "dropout": 0.0, "class_cond": class_cond}).eval()
    sched = ddpm.make_schedule("linear", 10)
    g = torch.Generator().manual_seed(1)
    test_x, test_y = torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8), torch.arange(7) % 10
    args = argparse.Namespace(batch_size=2, eval_images=3, class_cond=class_cond, pred="eps", seed=0, timesteps=10)
    metrics = ddpm.evaluate(net, sched, test_x, test_y, args, torch.device("cpu"))
    model_fn = ddpm.with_labels(net, test_y[:3]) if class_cond else net
    expected = ddpm.vlb_bits_per_dim(model_fn, sched, ddpm.to_model_range(test_x[:3]), "eps",
                                     torch.Generator().manual_seed(args.seed + 2))["total"]
    assert metrics["test_bpd_images"] == 3
    assert metrics["test_bpd"] == pytest.approx(expected.mean().item(), rel=1e-6)
