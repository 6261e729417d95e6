"""vae_no_encoder.py: the math against independent computations (sampling, torch.distributions,
direct per-pixel statistics), both networks, a few training steps, and the command line
(one subprocess; the rest in-process through main(argv))."""
import json
import math
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import vae_no_encoder as vne

TINY = ["--channels", "8", "--batch-size", "32", "--log-every", "2", "--device", "cpu", "--no-compile"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------

def test_corruption_has_the_stated_mean_and_variance():
    g = torch.Generator().manual_seed(0)
    a = 0.7
    x = torch.tensor([-1.0, -0.3, 0.0, 0.8]).view(1, 1, 2, 2)
    n = 200_000
    z = vne.corrupt(x.expand(n, 1, 2, 2), a, torch.randn(n, 1, 2, 2, generator=g))
    # q(z|x) = N(sqrt(a) x, 1 - a): standard error of the mean ~ 0.55/sqrt(n) ~ 0.0012
    assert torch.allclose(z.mean(dim=0), math.sqrt(a) * x[0], atol=6e-3)
    assert torch.allclose(z.var(dim=0), torch.full((1, 2, 2), 1 - a), rtol=1.5e-2)


def test_estimate_x0_eps_inverts_the_corruption():
    g = torch.Generator().manual_seed(1)
    a = 0.4
    x, eps = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)
    z = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    for pred, out in (("eps", eps), ("x0", x)):  # a perfect network, either target
        x0_hat, eps_hat = vne.estimate_x0_eps(a, z, out, pred)
        assert torch.allclose(x0_hat, x, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_normal_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(5)
    m1, m2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    lv1, lv2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(vne.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-5, atol=1e-6)


def test_negative_elbo_matches_full_gaussian_log_densities():
    """The reduction of section 3 against the model's densities written out with
    torch.distributions, on a 4-pixel case: per sample the decoder term must equal
    -log N(x; mu_theta(z), sigma^2) exactly, and on average over z the whole bound (decoder term
    + the KL in closed form) must equal -E_q[log p(x|z) + log p(z) - log q(z|x)]."""
    g = torch.Generator().manual_seed(2)
    a, log_std = 0.6, torch.tensor(math.log(0.3))
    x = torch.tensor([-1.0, -0.2, 0.5, 0.9]).view(1, 1, 2, 2)
    prior_mean = torch.tensor([-0.7, 0.1, 0.0, 0.3]).view(1, 1, 2, 2)
    prior_std = torch.tensor([0.5, 1.2, 0.9, 1.0]).view(1, 1, 2, 2)
    n = 100_000
    xs = x.expand(n, 1, 2, 2)
    eps = torch.randn(n, 1, 2, 2, generator=g)
    z = math.sqrt(a) * xs + math.sqrt(1 - a) * eps
    eps_hat = 0.8 * torch.tanh(z) - 0.1  # any function of z will do as "the network"
    mu = (z - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)

    log_px_z = Normal(mu, log_std.exp()).log_prob(xs).sum(dim=(1, 2, 3))
    log_pz = Normal(prior_mean, prior_std).log_prob(z).sum(dim=(1, 2, 3))
    log_qz_x = Normal(math.sqrt(a) * xs, math.sqrt(1 - a)).log_prob(z).sum(dim=(1, 2, 3))

    recon = vne.reconstruction_nll_from_noise(eps, eps_hat, a, log_std)
    assert torch.allclose(recon, -log_px_z, rtol=1e-4, atol=1e-3)  # per sample: an identity
    kl = vne.prior_kl(x, a, prior_mean, prior_std)
    expected_kl = kl_divergence(Normal(math.sqrt(a) * x, math.sqrt(1 - a)), Normal(prior_mean, prior_std)).sum()
    assert torch.allclose(kl, expected_kl, rtol=1e-5)
    bound = recon.mean() + kl
    mc = -(log_px_z + log_pz - log_qz_x).mean()
    assert abs(bound.item() - mc.item()) < 0.02 * abs(mc.item())


def test_x0_loss_is_the_same_eps_mse():
    """--pred x0 reports snr ||x - x0_hat||^2, which must be the eps-MSE of the same guess."""
    g = torch.Generator().manual_seed(3)
    a = 0.3
    x = torch.rand(5, 1, 6, 6, generator=g) * 2 - 1
    guess = lambda z: 0.5 * z  # noqa: E731  a fixed "network" output, read as x0_hat
    loss = vne.noise_prediction_loss(guess, x, a, "x0", generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # the same draw
    z = math.sqrt(a) * x + math.sqrt(1 - a) * eps
    eps_hat = (z - math.sqrt(a) * guess(z)) / math.sqrt(1 - a)
    assert torch.allclose(loss, ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4)


def test_fitted_prior_matches_the_corrupted_training_set():
    """The closed-form fitted prior against the per-pixel mean and std of many corrupted
    copies of a small training set."""
    g = torch.Generator().manual_seed(4)
    train_u8 = torch.randint(0, 256, (40, 8, 8), generator=g, dtype=torch.uint8)  # any image size will do
    train_u8[:, :3] = 0  # a background band, as in MNIST: variance only from the noise there
    a = 0.8
    mean, std = vne.fit_prior(vne.to_model_range(train_u8), a)
    x = train_u8.float().unsqueeze(1) / 127.5 - 1
    copies = 2000
    z = math.sqrt(a) * x.repeat(copies, 1, 1, 1) + math.sqrt(1 - a) * torch.randn(copies * 40, 1, 8, 8, generator=g)
    assert torch.allclose(mean, z.mean(dim=0, keepdim=True), atol=0.01)
    assert torch.allclose(std, z.std(dim=0, keepdim=True), atol=0.01)
    assert torch.allclose(mean[..., :3, :], torch.full((1, 1, 3, 8), -math.sqrt(a)))


def test_discretized_decoder_sums_to_one_over_the_256_levels():
    levels = torch.arange(256).float() / 127.5 - 1
    for mean, sigma in ((0.1, 0.05), (-0.95, 0.3), (0.99, 0.01)):
        logp = vne.discretized_gaussian_log_likelihood(levels, torch.tensor(mean), torch.tensor(2 * math.log(sigma)))
        assert abs(logp.exp().sum().item() - 1.0) < 1e-4


def test_discretized_decoder_against_normal_cdf_in_float64():
    """Each bin's probability against Phi(hi) - Phi(lo) from torch.distributions in float64, the
    edge bins open: log_var is a variance, sigma = e^(log_var / 2)."""
    k = torch.tensor([0, 1, 77, 128, 254, 255])
    x = k.double() / 127.5 - 1
    mean, sigma = 0.2, 0.4
    normal = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    lo = torch.where(k == 0, torch.tensor(-math.inf, dtype=torch.float64), x - 1 / 255)
    hi = torch.where(k == 255, torch.tensor(math.inf, dtype=torch.float64), x + 1 / 255)
    expected = (normal.cdf(hi) - normal.cdf(lo)).log()
    logp = vne.discretized_gaussian_log_likelihood(x.float(), torch.tensor(mean), torch.tensor(2 * math.log(sigma)))
    assert torch.allclose(logp.double(), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Networks and training
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["cnn", "unet"])
def test_both_archs_give_image_shaped_outputs(arch):
    model = vne.build_model({"arch": arch, "channels": 8, "alpha_bar": 0.5, "pred": "eps"})
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 1, 28, 28)
    assert set(model.state_dict()) >= {"prior_mean", "prior_std", "log_std"}
    samples, z = vne.generate(model, model, 4, "fitted")
    assert samples.shape == z.shape == (4, 1, 28, 28) and samples.abs().max() <= 1
    with pytest.raises(ValueError):
        vne.make_network("transformer", 8)


def test_cnn_has_no_skip_connections():
    # Every module of the plain CNN is in one sequential chain: no UNet, no residual blocks.
    net = vne.make_network("cnn", 8)
    assert isinstance(net, torch.nn.Sequential)
    assert not any(type(m).__name__ in ("ResBlock", "UNet") for m in net.modules())


@pytest.mark.parametrize("arch,pred", [("cnn", "x0"), ("unet", "eps")])
def test_a_few_steps_lower_the_loss(fake_mnist, arch, pred):
    torch.manual_seed(0)
    train_x, _ = vne.load_mnist(fake_mnist, train=True, device=torch.device("cpu"))
    x = vne.to_model_range(train_x[:32])
    model = vne.build_model({"arch": arch, "channels": 8, "alpha_bar": 0.8, "pred": pred})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def held_loss():
        with torch.no_grad():
            return vne.noise_prediction_loss(model, x, 0.8, pred, torch.Generator().manual_seed(9)).mean().item()

    before = held_loss()
    for _ in range(20):
        loss = vne.noise_prediction_loss(model, x, 0.8, pred).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.8 * before


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

class InProcess:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def vne_main(capsys, data, out, *args):
    argv = ["--data-dir", str(data), "--out-dir", str(out), *TINY, *map(str, args)]
    try:
        vne.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return InProcess(code, captured.out, captured.err)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and all(n in lines[0] for n in needles), lines[0]


def test_cli_smoke_and_sweep(run_script, capsys, fake_mnist, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("vae_no_encoder.py", "--data-dir", fake_mnist, "--out-dir", out, *TINY,
                      "--epochs", "2", "--sample-every", "1", "--alpha-bar", "0.5", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "bits/dim" in proc.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "denoise.png", "metrics.json", "samples_epoch_001.png",
                                       "samples_epoch_002.png", "samples_fitted.png", "samples_standard.png"]
    ckpt = load(os.path.join(out, "ckpt.pt"))  # plain data: loads with weights_only=True
    assert ckpt["kind"] == "vae_no_encoder" and ckpt["version"] == 2 and ckpt["ema"] is None
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2  # 256 images / 64 = 4 steps per epoch
    assert ckpt["config"]["alpha_bar"] == 0.5 and "cpu" in ckpt["rng"]
    assert not any("_orig_mod" in k for k in ckpt["model"])
    model = vne.build_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])  # what sample.py does
    assert model.log_std.item() < 0  # fitted after training (the initial value is 0)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("config", "step", "epochs_done", "train_loss", "train_images_per_sec", "sample_images_per_sec",
                "wall_time_s", "device", "parameters", "peak_memory_mb", "test_eps_mse", "test_x_mse", "test_bpd",
                "test_bpd_standard", "test_bpd_fitted", "test_bpd_decoder", "decoder_std"):
        assert metrics[key] is not None, key
    assert metrics["test_bpd_prior_fitted"] < metrics["test_bpd_prior_standard"]  # the fitted prior is the closer one
    assert metrics["test_bpd"] == metrics["test_bpd_fitted"]  # the model's prior, --prior (default fitted)

    # --eval-only: the same held-out numbers from the checkpoint (same weights, sigma, noise), its own
    # pictures and eval.json; the run's files untouched.
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    proc = vne_main(capsys, fake_mnist, out, "--eval-only", "--batch-size", "128")
    assert proc.returncode == 0, proc.stderr
    assert "evaluating" in proc.stdout and "bits/dim" in proc.stdout
    evaluated = json.load(open(os.path.join(out, "eval.json")))
    assert evaluated["step"] == 8 and evaluated["sample_images_per_sec"] > 0
    for key in ("test_eps_mse", "test_x_mse", "test_bpd", "test_bpd_standard", "test_bpd_fitted", "decoder_std"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert sorted(set(os.listdir(out)) - set(before)) == ["eval.json", "eval_denoise.png", "eval_samples_fitted.png",
                                                          "eval_samples_standard.png"]
    assert all(open(os.path.join(out, name), "rb").read() == data for name, data in before.items())

    sweep_dir = tmp_path / "sweep"
    proc = vne_main(capsys, fake_mnist, sweep_dir, "--sweep", out, out)
    assert proc.returncode == 0, proc.stderr
    table = json.load(open(sweep_dir / "sweep.json"))
    assert len(table) == 2 and table[0]["alpha_bar"] == 0.5 and os.path.exists(sweep_dir / "sweep.png")
    blocker = tmp_path / "a_file"  # an --out-dir below a regular file cannot be created
    blocker.write_text("not a folder")
    assert_one_line_error(vne_main(capsys, fake_mnist, blocker / "sweep", "--sweep", out), "--out-dir")


def test_resume_continues_exactly(capsys, fake_mnist, tmp_path, monkeypatch):
    """Also: --compile compiles the network for the training loss only; grids, evaluation and
    samples run it eagerly, as in ddpm.py (torch.compile is recorded here, not run)."""
    grad_enabled = []  # at each call of the "compiled" network

    def compile(net, **kw):
        return lambda *inputs: grad_enabled.append(torch.is_grad_enabled()) or net(*inputs)
    monkeypatch.setattr(torch, "compile", compile)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--sample-every", "5", "--arch", "cnn")
    assert vne_main(capsys, fake_mnist, straight, "--max-steps", "11", "--compile", *common).returncode == 0
    assert len(grad_enabled) == 11 and all(grad_enabled)  # the 11 training steps, nothing else
    assert vne_main(capsys, fake_mnist, split, "--max-steps", "5", *common).returncode == 0  # stops mid-epoch
    assert load(split / "ckpt.pt")["step"] == 5
    proc = vne_main(capsys, fake_mnist, split, "--max-steps", "11", "--resume", *common)
    assert proc.returncode == 0, proc.stderr
    assert "resumed" in proc.stdout and "at step 5" in proc.stdout
    a, b = load(straight / "ckpt.pt"), load(split / "ckpt.pt")
    assert a["step"] == b["step"] == 11
    for key in a["model"]:  # same batches, same noise, same optimizer state: the same weights
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("args,needle", [
    (["--alpha-bar", "0"], "--alpha-bar"),
    (["--alpha-bar", "1"], "--alpha-bar"),
    (["--alpha-bar", "1.5"], "--alpha-bar"),
    (["--alpha-bar", "-0.2"], "--alpha-bar"),
    (["--alpha-bar", "nan"], "--alpha-bar"),
    (["--alpha-bar", "high"], "--alpha-bar"),
    (["--arch", "transformer"], "--arch"),
    (["--pred", "v"], "--pred"),
    (["--prior", "uniform"], "--prior"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "1000"], "larger than the training set"),
    (["--eval-only", "--resume"], "exclude each other"),
    (["--sweep", "a", "--eval-only"], "exclude each other"),
])
def test_bad_arguments(capsys, fake_mnist, tmp_path, args, needle):
    assert_one_line_error(vne_main(capsys, fake_mnist, tmp_path / "run", *args), needle)
    assert not os.path.exists(tmp_path / "run")


def test_bad_checkpoints_never_overwrite(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "ckpt.pt"

    ckpt.write_bytes(b"this is not a checkpoint")
    assert_one_line_error(vne_main(capsys, fake_mnist, out, "--resume"), "not a readable checkpoint")
    assert_one_line_error(vne_main(capsys, fake_mnist, tmp_path / "s", "--sweep", out), "not a readable checkpoint")
    assert ckpt.read_bytes() == b"this is not a checkpoint"

    torch.save({"kind": "ddpm", "version": 1}, ckpt)
    before = ckpt.read_bytes()
    assert_one_line_error(vne_main(capsys, fake_mnist, out, "--resume"), "not a vae_no_encoder checkpoint")
    assert ckpt.read_bytes() == before

    torch.save({"kind": "vae_no_encoder", "version": 99}, ckpt)
    before = ckpt.read_bytes()
    assert_one_line_error(vne_main(capsys, fake_mnist, out, "--resume"), "checkpoint format 99")
    # A new run into a folder that holds a checkpoint refuses rather than overwrite it.
    assert_one_line_error(vne_main(capsys, fake_mnist, out), "exists", "--resume")
    assert ckpt.read_bytes() == before

    assert_one_line_error(vne_main(capsys, fake_mnist, tmp_path / "empty", "--resume"), "no checkpoint")
    assert_one_line_error(vne_main(capsys, fake_mnist, tmp_path / "empty", "--eval-only"), "no checkpoint")


def test_version_1_checkpoints_are_refused(capsys, fake_mnist, tmp_path):
    """Checkpoints of format 1 (before the buffer log_sigma became log_std) are refused with one
    line by every reader of a checkpoint, before anything is trained or written."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"kind": "vae_no_encoder", "version": 1, "config": {}, "model": {}}, out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    for mode in (["--resume"], ["--eval-only"]):
        assert_one_line_error(vne_main(capsys, fake_mnist, out, *mode), "checkpoint format 1", "format 2")
    assert_one_line_error(vne_main(capsys, fake_mnist, tmp_path / "s", "--sweep", out), "checkpoint format 1")
    assert os.listdir(out) == ["ckpt.pt"] and (out / "ckpt.pt").read_bytes() == before


def test_out_dir_that_cannot_be_created(capsys, fake_mnist, tmp_path):
    blocker = tmp_path / "a_file"  # a regular file: nothing can be created below it
    blocker.write_text("not a folder")
    assert_one_line_error(vne_main(capsys, fake_mnist, blocker / "run"), "--out-dir")
