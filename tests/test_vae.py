"""Tests for vae.py: each formula against an independent computation (torch.distributions,
closed forms), shapes, a short training run, and the command line in a subprocess."""
import json
import math
import os
import sys
import types

import pytest
import torch
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

import vae


# ---------------------------------------------------------------------------------------
# Formulas against torch.distributions
# ---------------------------------------------------------------------------------------

def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(16, 7, generator=g, dtype=torch.float64) * 2
    log_var = torch.randn(16, 7, generator=g, dtype=torch.float64) * 1.5
    zeros = torch.zeros_like(mu)
    # the ELBO's KL to the prior N(0, I), summed over the latent dims
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(vae.normal_kl(mu, log_var, zeros, zeros).sum(dim=1), expected)
    # and between two arbitrary diagonal Gaussians, elementwise
    mu2, log_var2 = mu.flip(0), log_var.flip(1)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(mu2, torch.exp(0.5 * log_var2)))
    torch.testing.assert_close(vae.normal_kl(mu, log_var, mu2, log_var2), expected)
    # zero exactly at the prior
    z = torch.zeros(1, 3)
    assert vae.normal_kl(z, z, z, z).abs().max().item() < 1e-7


def test_gaussian_log_density_matches_normal():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64)
    mean = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64)
    log_std = torch.randn(4, 1, 28, 28, generator=g, dtype=torch.float64) - 2
    expected = Normal(mean, torch.exp(log_std)).log_prob(x)
    torch.testing.assert_close(vae.gaussian_log_density(x, mean, log_std), expected)
    # the diagonal-Gaussian density used by the IWAE weights
    z, mu, log_var = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(dim=-1)
    torch.testing.assert_close(vae.log_normal_diag(z, mu, log_var), expected)


@pytest.mark.parametrize("likelihood,sigma", [("bernoulli", "learned"), ("gaussian", "0.1"), ("gaussian", "learned")])
def test_model_log_likelihood_matches_torch_distributions(likelihood, sigma):
    torch.manual_seed(2)
    net = vae.VAE("mlp", latent_dim=3, hidden_dim=16, likelihood=likelihood, sigma=sigma)
    out = torch.randn(6, 2 if net.learned_sigma else 1, 28, 28) * 3
    if likelihood == "bernoulli":
        x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
        expected = Bernoulli(logits=out).log_prob(x).sum(dim=(1, 2, 3))
    else:
        x = torch.rand(6, 1, 28, 28)
        if sigma == "learned":
            scale = torch.exp(torch.nn.functional.softplus(out[:, 1:] - vae.LOG_STD_MIN) + vae.LOG_STD_MIN)
        else:
            scale = torch.full_like(x, 0.1)
        expected = Normal(torch.sigmoid(out[:, :1]), scale).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(net.log_likelihood(x, out), expected, rtol=1e-5, atol=1e-2)


def test_bernoulli_likelihood_is_finite_for_confident_logits():
    # sigmoid then log would give log(0) here; the logits form must not
    x = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[-200.0, 200.0]]]])
    assert torch.allclose(vae.bernoulli_log_likelihood(x, logits), torch.tensor([-400.0]))


def test_bernoulli_likelihood_and_gradient_match_torch_distributions():
    # over the whole range: zero, small, ordinary, saturated logits; in float64, so that the
    # reference's own rounding does not matter
    torch.manual_seed(4)
    logits = torch.tensor([0.0, 1e-4, -1e-4, 0.5, -3.0, 7.0, 17.0, -17.0, 30.0, -30.0, 90.0, -90.0], dtype=torch.float64)
    logits = torch.cat([logits, torch.randn(500, dtype=torch.float64) * 6]).view(2, 1, 1, -1)
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    value = vae.bernoulli_log_likelihood(x, ours)
    expected = Bernoulli(logits=ref).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    expected.sum().backward()
    # and the gradient is x - sigmoid(l): target minus prediction, per pixel
    torch.testing.assert_close(ours.grad, ref.grad)
    torch.testing.assert_close(ours.grad, x - torch.sigmoid(logits))


def test_reparameterized_sample_has_right_mean_and_variance():
    g = torch.Generator().manual_seed(3)
    n = 200_000
    mu = torch.tensor([1.5, -2.0, 0.0])
    log_var = torch.tensor([0.0, math.log(0.25), math.log(4.0)])
    z = vae.reparameterize(mu, log_var, torch.randn(n, 3, generator=g))
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(z.var(0), torch.exp(log_var), atol=0, rtol=0.02)
    # gradients reach the encoder's outputs through the sample
    mu_ = mu.clone().requires_grad_()
    vae.reparameterize(mu_, log_var, torch.randn(10, 3, generator=g)).sum().backward()
    assert torch.equal(mu_.grad, torch.full((3,), 10.0))


def test_bits_per_dim_dequantized_of_the_uniform_density():
    # The uniform density on [0, 1]^784 gives every 8-bit image probability 256^-784:
    # -log p(x) = 0 nats must become exactly 8 bits/dim.
    assert vae.bits_per_dim_dequantized(0.0) == pytest.approx(8.0)
    # a density twice as high per pixel is one bit per dim better
    assert vae.bits_per_dim_dequantized(-784 * math.log(2)) == pytest.approx(7.0)


# ---------------------------------------------------------------------------------------
# IWAE against the exact marginal of probabilistic PCA
# ---------------------------------------------------------------------------------------
# p(z) = N(0, I_L), p(x | z) = N(W z + b, s^2 I_D)  =>  p(x) = N(b, W W^T + s^2 I_D)  (exact).
# The exact posterior is N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I; with orthogonal
# columns in W, M is diagonal, so a diagonal q(z | x) can be exact or deliberately wrong.

def ppca(seed=0, D=6, L=2, s=0.5):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, L, generator=g))
    W = q * torch.tensor([2.0, 1.2])        # orthogonal columns of different lengths
    b = torch.randn(D, generator=g)
    M_diag = (W ** 2).sum(0) + s ** 2
    x = MultivariateNormal(b, W @ W.T + s ** 2 * torch.eye(D)).sample((64,))
    true = MultivariateNormal(b, W @ W.T + s ** 2 * torch.eye(D)).log_prob(x)

    def log_lik(x, z):
        return Normal(z @ W.T + b, s).log_prob(x).sum(-1)

    def posterior(x, shift=0.0, var_scale=1.0):
        mu = (x - b) @ W / M_diag + shift
        log_var = torch.log(s ** 2 / M_diag * var_scale).expand_as(mu)
        return mu, log_var

    return x, true, log_lik, posterior


def test_iwae_with_exact_posterior_is_exact_for_any_k_and_chunking():
    x, true, log_lik, posterior = ppca()
    g = torch.Generator().manual_seed(0)
    for k, rows in [(1, 4096), (7, 64), (300, 128)]:  # rows < B * k: several chunks
        bound = vae.iwae_bound(posterior, log_lik, x, k, rows=rows, generator=g)
        torch.testing.assert_close(bound, true, atol=1e-4, rtol=1e-5)


def test_iwae_approaches_log_px_from_below_as_k_grows():
    x, true, log_lik, posterior = ppca(seed=1)
    wrong_q = lambda x: posterior(x, shift=0.4, var_scale=2.5)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    true_mean = true.mean().item()
    means = []
    for k in (1, 10, 100, 2000):
        reps = 20 if k < 2000 else 2  # average enough draws that the trend is not noise
        means.append(torch.stack([vae.iwae_bound(wrong_q, log_lik, x, k, rows=4096, generator=g)
                                  for _ in range(reps)]).mean().item())
    gaps = [true_mean - m for m in means]
    assert gaps[0] > 0.3, gaps                          # a wrong q: the ELBO is visibly loose
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # tighter with every K
    assert gaps[-1] > -0.01, gaps                       # still a lower bound
    assert gaps[-1] < 0.05 * gaps[0], gaps              # and nearly exact at K = 2000


# ---------------------------------------------------------------------------------------
# Networks and training
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("likelihood,sigma", [("bernoulli", "learned"), ("gaussian", "0.2"), ("gaussian", "learned")])
def test_shapes(arch, likelihood, sigma):
    cfg = dict(arch=arch, latent_dim=5, hidden_dim=32, channels=4, likelihood=likelihood, sigma=sigma, class_cond=False)
    net = vae.build_model(cfg)
    x = torch.rand(3, 1, 28, 28)
    mu, log_var = net.encode(x)
    assert mu.shape == log_var.shape == (3, 5)
    out = net.decode(mu)
    assert out.shape == (3, 2 if sigma == "learned" and likelihood == "gaussian" else 1, 28, 28)
    assert net.log_likelihood(x, out).shape == (3,)
    m = net.mean(out)
    assert m.shape == (3, 1, 28, 28) and 0 <= m.min() and m.max() <= 1
    eps = torch.randn(3, 5)
    out, mu, log_var = net(x, eps)  # the forward pass: encode, z = mu + sigma eps, decode
    assert out.shape == net.decode(mu).shape and mu.shape == log_var.shape == (3, 5)
    recon, kl = vae.elbo_terms(net, net, x, eps)
    assert recon.shape == kl.shape == (3,) and (kl >= 0).all()
    model_fn = vae.make_model_fn(net, torch.device("cpu"), amp=False)
    torch.testing.assert_close(vae.elbo_terms(model_fn, net, x, eps), (recon, kl))
    samples = net.sample(4, torch.Generator().manual_seed(0))  # z ~ N(0, I), decoded to E[x | z]
    assert samples.shape == (4, 1, 28, 28) and 0 <= samples.min() and samples.max() <= 1


def test_data_scaling():
    k = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    # the range: grey levels k / 255, a channel axis added
    assert torch.equal(vae.to_model_range(k), torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    # binarization: 0 and 1 stay, level 51 becomes 1 with probability 0.2
    xb = vae.binarize(vae.to_model_range(k.expand(4000, 1, 3)), g)
    assert set(xb.unique().tolist()) <= {0.0, 1.0} and xb[:, 0, 0, 0].sum() == 0 and xb[:, 0, 0, 2].sum() == 4000
    assert xb[:, 0, 0, 1].mean().item() == pytest.approx(0.2, abs=0.02)
    # dequantization: level k lands uniformly in its bin [k/256, (k+1)/256)
    xg = vae.dequantize(k.expand(4000, 1, 3), g)
    assert 0 <= xg[..., 0].min() and xg[..., 0].max() < 1 / 256          # bin of level 0
    assert 255 / 256 <= xg[..., 2].min() and xg[..., 2].max() < 1        # bin of level 255
    assert (xg[..., 1] * 256 - 51).mean().item() == pytest.approx(0.5, abs=0.02)  # u ~ U[0, 1): mean 1/2
    # each likelihood gets its own data
    assert set(vae.likelihood_data(k, "bernoulli", True, g).unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(vae.likelihood_data(k, "bernoulli", False), vae.to_model_range(k))
    assert (vae.likelihood_data(k, "gaussian", False, g) * 256).floor().equal(k.unsqueeze(1).float())


@pytest.mark.parametrize("arch,likelihood", [("mlp", "bernoulli"), ("cnn", "gaussian")])
def test_a_few_steps_lower_the_loss(fake_mnist, arch, likelihood):
    torch.manual_seed(0)
    images, _ = vae.load_mnist(fake_mnist, train=True, device=torch.device("cpu"))
    net = vae.VAE(arch, latent_dim=8, hidden_dim=64, channels=8, likelihood=likelihood, sigma="learned")
    model_fn = vae.make_model_fn(net, torch.device("cpu"), amp=False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    x_eval = vae.likelihood_data(images[:64], likelihood, True, g)
    eps_eval = torch.randn(64, 8, generator=g)

    def held_loss():
        with torch.no_grad():
            return vae.vae_loss(*vae.elbo_terms(model_fn, net, x_eval, eps_eval), 1.0).item()

    before = held_loss()
    for i in range(40):
        x = vae.likelihood_data(images[(i % 4) * 64:(i % 4 + 1) * 64], likelihood, True)
        loss = vae.vae_loss(*vae.elbo_terms(model_fn, net, x, torch.randn(64, 8)), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_loss()
    assert after < before - 0.1 * abs(before), (before, after)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

TINY = ["--hidden-dim", "32", "--latent-dim", "2", "--batch-size", "32", "--iw-samples", "20",
        "--iw-images", "8", "--num-samples", "16", "--log-every", "2"]


def test_cli_train_resume_eval(fake_mnist, run_script, tmp_path, capsys):
    out = tmp_path / "run"
    r = run_script("vae.py", "--data-dir", fake_mnist, "--out-dir", out, "--epochs", "2",
                   "--max-steps", "3", *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("ckpt.pt", "metrics.json", "samples_epoch_000.png", "reconstructions.png",
                 "interpolation.png", "manifold.png", "latent_space.png"):
        assert (out / name).is_file(), name
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "vae" and ckpt["step"] == 3 and ckpt["ema"] is None
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    net = vae.build_model(ckpt["config"])
    net.load_state_dict(ckpt["model"])  # build_model rebuilds exactly what was saved
    m = json.loads((out / "metrics.json").read_text())
    assert m["step"] == 3 and m["test_iwae_k"] == 20 and math.isfinite(m["test_iwae_nll"])
    assert m["test_neg_elbo"] == pytest.approx(m["test_recon"] + m["test_kl"])
    assert m["train_images_per_sec"] > 0 and m["sample_images_per_sec"] > 0  # the keys of every script's metrics

    # resume (in-process through main(), the same code path, to save a second interpreter start):
    # continues at step 3 to the end of epoch 2 (256 images // 32 = 8 steps/epoch)
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--epochs", "2", "--resume", *TINY])
    assert "resumed" in (log := capsys.readouterr().out) and "at step 3 (epoch 0)" in log
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 16
    assert (out / "samples_epoch_002.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["step"] == 16

    # standalone evaluation of the checkpoint
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--eval-only", "--iw-samples", "10", "--iw-images", "4"])
    e = json.loads((out / "eval.json").read_text())
    assert e["step"] == 16 and e["test_iwae_k"] == 10 and (out / "eval_reconstructions.png").is_file()


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vae.py: error:"), stderr
    return lines[0]


@pytest.mark.parametrize("argv,words", [
    (["--arch", "transformer"], "invalid choice"),
    (["--likelihood", "poisson"], "invalid choice"),
    (["--latent-dim", "0"], "an integer >= 1"),
    (["--likelihood", "gaussian", "--sigma", "-1"], "'learned' or a positive number"),
    (["--sigma", "0.1"], "--sigma applies to --likelihood gaussian"),
    (["--likelihood", "gaussian", "--no-binarize"], "apply to --likelihood bernoulli"),
    (["--lr", "nan"], "a number > 0"),
])
def test_bad_arguments_give_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        vae.parse_args(argv)
    assert e.value.code == 2
    assert words in one_error_line(capsys.readouterr().err)


def test_foreign_checkpoint_is_refused_and_good_one_kept(fake_mnist, tmp_path, capsys):
    # a ddpm checkpoint (in this process: test_cli_train_resume_eval runs the command line itself)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"kind": "ddpm", "version": 1}, foreign / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(foreign), "--resume"])
    assert e.value.code == 2 and "not a vae checkpoint" in one_error_line(capsys.readouterr().err)

    # garbage bytes
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ckpt.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(garbage), "--resume"])
    assert e.value.code == 2 and "not a readable checkpoint" in one_error_line(capsys.readouterr().err)
    assert (garbage / "ckpt.pt").read_bytes() == b"\x00not a checkpoint" * 10

    # a good checkpoint is never overwritten by a new run without --resume
    good = tmp_path / "good"
    good.mkdir()
    state = {"kind": "vae", "version": vae.CKPT_VERSION, "step": 7}
    torch.save(state, good / "ckpt.pt")
    before = (good / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(good)])
    assert e.value.code == 2 and "--resume" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(good), "--resume", "--arch", "rnn"])
    capsys.readouterr()
    assert (good / "ckpt.pt").read_bytes() == before
    # a checkpoint from a newer vae.py
    torch.save({"kind": "vae", "version": vae.CKPT_VERSION + 1}, foreign / "ckpt.pt")
    with pytest.raises(SystemExit):
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(foreign), "--eval-only"])
    assert f"format {vae.CKPT_VERSION + 1}" in one_error_line(capsys.readouterr().err)


def test_old_format_checkpoint_is_refused_with_one_line(fake_mnist, tmp_path, capsys):
    # format 1, as vae.py wrote it before the vocabulary was shared: `conditional`, not `class_cond`,
    # and the weights under other names. Refused, for --resume and --eval-only, and left as it was.
    out = tmp_path / "v1"
    out.mkdir()
    config = dict(arch="mlp", latent_dim=2, hidden_dim=32, channels=32, likelihood="bernoulli", sigma=None,
                  binarize=True, conditional=False, seed=0, batch_size=32, lr=1e-3, beta=1.0)
    torch.save({"kind": "vae", "version": 1, "config": config, "step": 2, "epoch": 0,
                "model": {"encoder.net.1.weight": torch.zeros(32, 784)}}, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    for flag in ("--resume", "--eval-only"):
        with pytest.raises(SystemExit) as e:
            vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), flag, *TINY])
        line = one_error_line(capsys.readouterr().err)
        assert e.value.code == 2 and "checkpoint format 1" in line and "retrain" in line, line
    assert (out / "ckpt.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]


def test_sigma_is_kept_as_text_and_checked(fake_mnist, tmp_path, capsys):
    args = vae.parse_args(["--likelihood", "gaussian", "--sigma", "0.1"])
    assert args.sigma == "0.1"  # one type in args and in the checkpoint's config: the text given
    assert vae.parse_args(["--likelihood", "gaussian"]).sigma == "learned"
    assert vae.build_model(vars(args)).fixed_sigma == 0.1
    # a fixed sigma trains, resumes and evaluates with the value it was given
    out = tmp_path / "fixed"
    common = ["--data-dir", fake_mnist, "--out-dir", str(out), "--device", "cpu", *TINY]
    vae.main([*common, "--likelihood", "gaussian", "--sigma", "0.1", "--max-steps", "2", "--iw-samples", "0"])
    vae.main([*common, "--resume", "--likelihood", "gaussian", "--max-steps", "3", "--iw-samples", "0"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["sigma"] == "0.1" and m["step"] == 3 and "test_bpd" in m
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--eval-only", "--iw-samples", "4", "--iw-images", "4"])
    e = json.loads((out / "eval.json").read_text())
    assert "(sigma 0.1)" in capsys.readouterr().out and "test_bpd_iwae" in e
    # bits/dim: nats over 784 ln 2, plus the 8 bits of the dequantization bins
    assert e["test_bpd"] == pytest.approx(e["test_neg_elbo"] / (784 * math.log(2)) + 8)


def test_bad_input_leaves_no_out_dir_and_an_unwritable_one_is_one_line(fake_mnist, tmp_path, capsys):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("")
    cases = [
        (["--data-dir", str(not_a_dir)], "could not load MNIST"),                # a bad --data-dir
        (["--data-dir", fake_mnist, "--batch-size", "100000"], "--batch-size"),  # larger than the data
    ]
    for i, (argv, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(SystemExit) as e:
            vae.main(["--out-dir", str(out), *argv])
        assert e.value.code == 2 and words in one_error_line(capsys.readouterr().err)
        assert not out.exists()  # checked before the folder is made
    # an --out-dir that cannot be created: below a regular file
    with pytest.raises(SystemExit) as e:
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(not_a_dir / "run"), *TINY])
    line = one_error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "error" in line and "--out-dir" in line


def test_score_samples_hands_score_py_the_prior_draws(fake_mnist, tmp_path, monkeypatch):
    # score.py stands in as a fake module: what vae.py asks of it, and what it hands over
    calls = []
    fake = types.ModuleType("score")
    fake.check_classifier = lambda path, data_dir: calls.append(("check", path, data_dir))

    def draw_and_score(draw, n, device, cost, classifier, data_dir, seed, labels=None):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = draw(10, gen) if labels is None else draw(10, gen, labels[:10])
        calls.append(("score", n, classifier, data_dir, seed, labels, x))
        return {"fd": 1.5, "n": n}
    fake.draw_and_score = draw_and_score
    monkeypatch.setitem(sys.modules, "score", fake)
    for cond in ([], ["--class-cond"]):
        calls.clear()
        out = tmp_path / f"scored{len(cond)}"
        vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--max-steps", "2", "--iw-samples", "0",
                  "--score-samples", "30", "--classifier", "clf.pt", "--seed", "5", *TINY, *cond])
        assert calls[0] == ("check", "clf.pt", fake_mnist)  # checked before the run, not after it
        _, n, classifier, data_dir, seed, labels, x = calls[1]
        assert (n, classifier, data_dir, seed) == (30, "clf.pt", fake_mnist, 5)
        assert x.shape == (10, 1, 28, 28) and 0 <= x.min() and x.max() <= 1  # decoder means, not binary draws
        assert len(x.unique()) > 2
        if cond:  # the ten digits equally often
            assert torch.equal(labels, torch.arange(30) % 10)
        else:
            assert labels is None
        assert json.loads((out / "metrics.json").read_text())["score"] == {"fd": 1.5, "n": 30}
