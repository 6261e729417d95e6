"""latent_diffusion.py: the latent bound against exact Gaussian likelihoods (torch.distributions),
the change of variables of the latent scale, the VAE bound with the prior swapped against
vae.py's ELBO, and the command line (train, resume, evaluate, sample.py) on the fake MNIST."""
import json
import math
import os
import shutil

import pytest
import torch

import ddpm
import latent_diffusion as ld
import vae
from test_ddpm_cli import assert_one_line_error, load


def gaussian_x0_denoiser(sched, cov):
    """The exact E[u_0 | u_t] when u_0 ~ N(0, cov): u_t = sqrt(ab) u_0 + sqrt(1 - ab) eps is
    jointly Gaussian with u_0, so E[u_0 | u_t] = sqrt(ab) cov (ab cov + (1 - ab) I)^-1 u_t."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)

    def model_fn(u_t, t):
        assert (t == t[0]).all()  # the bound calls it with one timestep for the whole batch
        ab = sched["alpha_bar"][t[0]].to(cov.dtype)
        gain = ab.sqrt() * torch.linalg.solve(ab * cov + (1 - ab) * eye, cov, left=False)  # cov A^-1, A symmetric
        return u_t @ gain.T
    return model_fn


def expected_bound_of_gaussian_data(sched, eigenvalues, variance="beta"):
    """E[L_diff(u_0)] for u_0 ~ N(0, cov) and the exact denoiser, in closed form, summed over the
    eigenvalues lam of cov (the forward process is isotropic: each eigen-direction is a 1-d
    problem). With the exact E[u_0 | u_t] the means of q(u_{t-1} | u_t, u_0) (variance
    beta_tilde_t) and of p (variance sigma_t^2) differ by c_t (u_0 - E[u_0 | u_t]),
    c_t = post_coef_x0, so E[L_t] = 1/2 (log(sigma^2 / beta_tilde) + (beta_tilde + c_t^2 V_t) / sigma^2 - 1),
    V_t = Var(u_0 | u_t) = lam (1 - ab_t) / (ab_t lam + 1 - ab_t); L_0 is the Gaussian -log density
    of that error (c_0 = 1) with variance sigma_0^2; L_prior the KL of N(sqrt(ab) u_0, 1 - ab)
    to N(0, 1), averaged over u_0. sigma_t^2 = beta_t, or beta_tilde_t (clipped at t = 0)."""
    ab, total = sched["alpha_bar"], 0.0
    sigma2 = sched["betas"] if variance == "beta" else sched["post_log_var"].exp()
    for lam in eigenvalues.tolist():
        v = lam * (1 - ab) / (ab * lam + 1 - ab)
        total += 0.5 * (-1 - torch.log(1 - ab[-1]) + 1 - ab[-1] + ab[-1] * lam)
        bt, c, s2 = sched["post_var"][1:], sched["post_coef_x0"][1:], sigma2[1:]
        total += (0.5 * (torch.log(s2 / bt) + (bt + c ** 2 * v[1:]) / s2 - 1)).sum()
        total += 0.5 * (math.log(2 * math.pi) + sigma2[0].log() + v[0] / sigma2[0])
    return float(total)


def test_bound_with_the_exact_denoiser_is_its_closed_form_and_just_above_the_gaussian_nll():
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.2 * torch.eye(4, dtype=torch.float64)  # a full covariance
    sched = {k: v.double() for k, v in ddpm.make_schedule("linear", 1000).items()}
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=torch.float64), cov)
    u0 = gaussian.sample((4000,))
    bound = ld.latent_bound(gaussian_x0_denoiser(sched, cov), sched, u0, "x0", torch.Generator().manual_seed(1))
    gap = bound + gaussian.log_prob(u0)  # bound - NLL, per vector
    eigenvalues = torch.linalg.eigvalsh(cov)
    expected_gap = expected_bound_of_gaussian_data(sched, eigenvalues) - gaussian.entropy().item()
    assert abs(gap.mean().item() - expected_gap) < 4 * gap.std().item() / math.sqrt(len(gap))
    assert 0 < expected_gap < 0.01 * 4  # not below the NLL, and close
    # The sampler's variances, beta_tilde_t, would leave about 0.58 nats per dimension:
    loose = expected_bound_of_gaussian_data(sched, eigenvalues, "beta_tilde") - gaussian.entropy().item()
    assert 0.5 * 4 < loose < 0.6 * 4


@pytest.mark.parametrize("scale", [0.2, 3.0])
def test_change_of_variables_of_the_latent_scale(scale):
    """z ~ N(0, s^2 I): the DDPM on u = z / s (exact denoiser of N(0, I)) with the L log s
    correction bounds -log N(z; 0, s^2 I) with the (tiny) gap of N(0, I) data, where leaving
    out L log s would be off by far more."""
    L = 3
    sched = {k: v.double() for k, v in ddpm.make_schedule("linear", 1000).items()}
    z = scale * torch.randn(3000, L, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    denoiser = gaussian_x0_denoiser(sched, torch.eye(L, dtype=torch.float64))
    bound = ld.prior_bound(denoiser, sched, z, scale, "x0", torch.Generator().manual_seed(3))
    gap = bound + torch.distributions.Normal(0.0, scale).log_prob(z).sum(1)
    expected_gap = expected_bound_of_gaussian_data(sched, torch.ones(L)) - L * 0.5 * math.log(2 * math.pi * math.e)
    assert abs(gap.mean().item() - expected_gap) < 4 * gap.std().item() / math.sqrt(len(gap)) + 1e-3 < abs(L * math.log(scale))
    unscaled = ld.latent_bound(denoiser, sched, z / scale, "x0", torch.Generator().manual_seed(3))
    torch.testing.assert_close(bound, unscaled + L * math.log(scale))


def tiny_vae(latent_dim=3):
    torch.manual_seed(0)
    net = vae.VAE("mlp", latent_dim=latent_dim, hidden_dim=16).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_vae_bound_with_the_standard_prior_is_vaes_elbo():
    """Same code path, prior swapped to N(0, I): in expectation over z the cross-entropy minus
    the entropy is vae.py's closed-form KL; the reconstruction is the same number."""
    net, reps = tiny_vae(), 10000
    x = torch.bernoulli(torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(4)))
    x_rep = x.repeat(reps, 1, 1, 1)
    eps = torch.randn(3 * reps, 3, generator=torch.Generator().manual_seed(5))
    recon, prior_term = ld.vae_bound(net, x_rep, eps, ld.standard_normal_nll)
    r, kl = vae.elbo_terms(net, net, x_rep, eps)
    torch.testing.assert_close(recon, r)
    diff = (prior_term - kl).view(reps, 3)  # per image: its mean over z is 0
    assert (diff.mean(0).abs() < 4 * diff.std(0) / math.sqrt(reps)).all(), diff.mean(0)


def test_denoiser_starts_at_zero_and_depends_on_u_and_t():
    net = ld.build_model({"latent_dim": 5, "width": 16, "depth": 2, "dropout": 0.0})
    u, t = torch.randn(4, 5), torch.tensor([0, 10, 500, 999])
    assert torch.equal(net(u, t), torch.zeros(4, 5))  # zero-initialised output layer
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = net(u, t)
    assert out.shape == (4, 5)
    assert not torch.allclose(out, net(u, t.flip(0))) and not torch.allclose(out, net(2 * u, t))


# --- the command line ----------------------------------------------------------------------

SMALL = ["--width", "16", "--depth", "1", "--timesteps", "10", "--batch-size", "32", "--max-steps", "2",
         "--num-samples", "4", "--device", "cpu"]

def ld_main(capsys, data, out, *args):
    """latent_diffusion.main in this process: an object with returncode, stdout, stderr."""
    from test_ddpm_cli import InProcess
    try:
        ld.main(["--data-dir", str(data), "--out-dir", str(out), *SMALL, *map(str, args)])  # later flags win
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return InProcess(code, captured.out, captured.err)


def test_trains_resumes_exactly_and_evaluates(capsys, fake_mnist, checkpoints, tmp_path, monkeypatch):
    """Also: --compile compiles the training network only; the samplers run eagerly, as in ddpm.py
    (torch.compile is recorded here, not run)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    vae_ckpt = tmp_path / "vae.pt"
    shutil.copy(checkpoints["vae"], vae_ckpt)
    common = ("--vae-ckpt", vae_ckpt, "--eval-images", "4", "--sample-every", "1")
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = ld_main(capsys, fake_mnist, straight, "--max-steps", "10", "--compile", *common)
    assert proc.returncode == 0, proc.stderr
    assert len(compiled) == 1 and all(p.requires_grad for p in compiled[0].parameters())  # not the EMA copy
    assert "3-d latents" in proc.stdout and "with the diffusion prior" in proc.stdout
    assert ld_main(capsys, fake_mnist, split, "--max-steps", "5", *common).returncode == 0
    proc = ld_main(capsys, fake_mnist, split, "--max-steps", "10", "--resume", "--eval-images", "4",
                   "--sample-every", "1")  # --vae-ckpt: from the checkpoint
    assert proc.returncode == 0, proc.stderr
    a, b = load(straight / "ckpt.pt"), load(split / "ckpt.pt")
    assert a["kind"] == "latent_diffusion" and a["step"] == b["step"] == 10
    assert a["vae_sha256"] == ld.file_sha256(vae_ckpt) and a["latent_scale"] == b["latent_scale"] > 0
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    metrics = json.load(open(straight / "metrics.json"))
    for key in ("test_bound_standard", "test_bound_diffusion", "test_neg_elbo", "test_recon", "train_images_per_sec",
                "sample_images_per_sec"):
        assert math.isfinite(metrics[key]), key
    assert metrics["test_images"] == 4 and not any(k.startswith("test_bpd") for k in metrics)  # Bernoulli: nats only
    assert {"compare.png", "samples_epoch_001.png", "samples_step_000010.png"} <= set(os.listdir(straight))
    proc = ld_main(capsys, fake_mnist, straight, "--eval-only", "--eval-images", "2", "--iw-samples", "3", "--compile")
    assert proc.returncode == 0 and len(compiled) == 1, proc.stderr
    result = json.load(open(straight / "eval.json"))
    assert result["test_images"] == result["test_iwae_images"] == 2 and math.isfinite(result["test_iwae_nll"])


def test_a_changed_vae_is_refused(capsys, fake_mnist, checkpoints, tmp_path):
    vae_ckpt, out = tmp_path / "vae.pt", tmp_path / "run"
    shutil.copy(checkpoints["vae"], vae_ckpt)
    assert ld_main(capsys, fake_mnist, out, "--vae-ckpt", vae_ckpt, "--eval-images", "0").returncode == 0
    changed = load(vae_ckpt)
    changed["model"] = {k: v + 0.01 for k, v in changed["model"].items()}
    torch.save(changed, vae_ckpt)
    for args in (["--eval-only"], ["--resume", "--max-steps", "4"]):
        assert_one_line_error(ld_main(capsys, fake_mnist, out, *args), "changed since")
    import sample
    try:
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--out", str(tmp_path / "g.png")])
        code = 0
    except SystemExit as e:
        code = e.code
    assert code == 2 and "changed since" in capsys.readouterr().err


@pytest.mark.parametrize("which,needle", [
    (None, "needs --vae-ckpt"),
    ("missing", "no checkpoint"),
    ("ddpm", "not a vae checkpoint"),
])
def test_bad_vae_checkpoints(capsys, fake_mnist, checkpoints, tmp_path, which, needle):
    args = [] if which is None else ["--vae-ckpt", tmp_path / "nothing.pt" if which == "missing" else checkpoints[which]]
    assert_one_line_error(ld_main(capsys, fake_mnist, tmp_path / "run", *args), needle)
    assert not os.path.exists(tmp_path / "run")


def test_a_conditional_vae_is_refused(capsys, fake_mnist, tmp_path):
    from conftest import TINY_VAE
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(tmp_path / "cvae"), *TINY_VAE, "--class-cond"])
    capsys.readouterr()
    proc = ld_main(capsys, fake_mnist, tmp_path / "run", "--vae-ckpt", tmp_path / "cvae" / "ckpt.pt")
    assert_one_line_error(proc, "conditional")


def test_a_gaussian_vae_reports_bits_per_dim(capsys, fake_mnist, tmp_path):
    """The bounds of a Gaussian VAE (a density on dequantized digits) also in 8-bit bits/dim:
    (nats + 784 ln 256) / (784 ln 2); test_bpd is the bound with the diffusion prior."""
    from conftest import TINY_VAE
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(tmp_path / "gvae"), *TINY_VAE, "--likelihood", "gaussian"])
    capsys.readouterr()
    proc = ld_main(capsys, fake_mnist, tmp_path / "run", "--vae-ckpt", tmp_path / "gvae" / "ckpt.pt", "--eval-images", "3")
    assert proc.returncode == 0, proc.stderr
    assert "bits/dim" in proc.stdout
    m = json.load(open(tmp_path / "run" / "metrics.json"))
    for nats, bpd in (("test_bound_diffusion", "test_bpd"), ("test_bound_standard", "test_bpd_standard"),
                      ("test_neg_elbo", "test_bpd_neg_elbo")):
        assert m[bpd] == pytest.approx((m[nats] + 784 * math.log(256)) / (784 * math.log(2))), bpd
