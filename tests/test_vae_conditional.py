"""The conditional VAE (--class-cond): its ELBO terms against a direct computation with the
label written into the inputs by hand, the label's place in both architectures, and the
command line on the fake MNIST."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import vae


def cvae(arch, seed=0):
    torch.manual_seed(seed)
    return vae.VAE(arch=arch, latent_dim=3, hidden_dim=16, channels=4, class_cond=True).eval()


@torch.no_grad()
def test_mlp_cvae_elbo_terms_against_a_direct_computation():
    net = cvae("mlp")
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5, 1, 28, 28, generator=g) > 0.5).float()
    y, eps = torch.tensor([0, 3, 3, 7, 9]), torch.randn(5, 3, generator=g)
    recon, kl = vae.elbo_terms(net, net, x, eps, y)

    # By hand: q(z | x, y) from [x | one-hot y], p(x | z, y) from [z | one-hot y].
    one_hot = torch.zeros(5, 10)
    one_hot[torch.arange(5), y] = 1
    enc1, enc2 = net.encoder[0], net.encoder[2]
    h = torch.relu(torch.cat([x.view(5, 784), one_hot], 1) @ enc1.weight.T + enc1.bias)
    mu, log_var = (h @ enc2.weight.T + enc2.bias).chunk(2, dim=1)
    z = mu + (0.5 * log_var).exp() * eps
    dec1, dec2 = net.decoder[0], net.decoder[2]
    logits = torch.relu(torch.cat([z, one_hot], 1) @ dec1.weight.T + dec1.bias) @ dec2.weight.T + dec2.bias
    expected_recon = -Bernoulli(logits=logits).log_prob(x.view(5, 784)).sum(1)
    expected_kl = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(recon, expected_recon, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kl, expected_kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@torch.no_grad()
def test_the_label_reaches_both_networks(arch):
    net = cvae(arch)
    first_encoder_layer = net.encoder[0]
    if arch == "mlp":
        assert first_encoder_layer.in_features == 784 + 10
    else:
        assert first_encoder_layer.in_channels == 1 + 10  # the one-hot label as 10 constant planes
    assert net.decoder[0].in_features == 3 + 10
    x, z = torch.rand(4, 1, 28, 28), torch.randn(4, 3)
    a, b = torch.tensor([1, 1, 1, 1]), torch.tensor([2, 2, 2, 2])
    assert not torch.allclose(net.encode(x, a)[0], net.encode(x, b)[0])
    assert not torch.allclose(net.decode(z, a), net.decode(z, b))
    assert net.decode(z, a).shape == (4, 1, 28, 28) and net.encode(x, a)[0].shape == (4, 3)
    with pytest.raises(ValueError, match="needs the labels"):
        net.decode(z)
    with pytest.raises(ValueError, match="unconditional"):
        vae.VAE(arch=arch, latent_dim=3, hidden_dim=16, channels=4).decode(z, a)


@torch.no_grad()
def test_cvae_iwae_matches_the_elbo_at_k_1_in_expectation():
    """L_1 is a one-sample ELBO: averaged over many draws the two agree, with the labels."""
    net = cvae("mlp")
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    y = torch.tensor([4, 5, 6])
    k = 4000
    l_k1 = torch.stack([vae.iwae_bound(lambda v: net.encode(v, y),
                                       lambda v, z: net.log_likelihood(v, net.decode(z, y.repeat(len(z) // 3))),
                                       x, 1, generator=torch.Generator().manual_seed(s)) for s in range(200)]).mean(0)
    eps = torch.randn(k, 3, generator=torch.Generator().manual_seed(3))
    neg_elbo = torch.stack([sum(vae.elbo_terms(net, net, x, eps[i].expand(3, 3), y)) for i in range(0, k, 20)]).mean(0)
    torch.testing.assert_close(-l_k1, neg_elbo, atol=1.5, rtol=0.01)


TINY = ["--hidden-dim", "16", "--latent-dim", "3", "--batch-size", "32", "--iw-samples", "5", "--iw-images", "8",
        "--num-samples", "20", "--device", "cpu", "--class-cond"]


def test_cli_conditional_train_resume_eval(fake_mnist, classifier, tmp_path, capsys):
    out = tmp_path / "cvae"
    common = ["--data-dir", fake_mnist, "--out-dir", str(out), *TINY]
    vae.main([*common, "--max-steps", "3", "--score-samples", "20", "--classifier", classifier])  # score.py's, for real
    stdout = capsys.readouterr().out
    assert "conditional on the label" in stdout
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["bound_of"].startswith("-log p(x | y)") and metrics["test_iwae_nll"] > 0
    assert metrics["score"]["n"] == 20 and 0 <= metrics["score"]["accuracy"] <= 1 and "fd" in metrics["score"]
    assert (out / "style.png").exists() and not (out / "interpolation.png").exists()
    from PIL import Image
    assert Image.open(out / "samples_epoch_000.png").size == (2 * 30 + 2, 10 * 30 + 2)  # a row per digit
    assert Image.open(out / "style.png").size == (11 * 30 + 2, 8 * 30 + 2)
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--resume", "--max-steps", "5", "--iw-samples", "0",
              "--device", "cpu"])  # no --class-cond: the checkpoint's is kept
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["class_cond"] and ckpt["step"] == 5
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(out), "--eval-only", "--iw-samples", "0", "--device", "cpu"])
    assert json.load(open(out / "eval.json"))["bound_of"].startswith("-log p(x | y)")
