"""
vae.py: the Variational Autoencoder (Kingma & Welling 2014) on MNIST, from scratch, in one file.

A VAE is a latent-variable model  p(x, z) = p(z) p(x | z),  p(z) = N(0, I),  with a decoder
network for p(x | z). Its marginal likelihood log p(x) = log E_{p(z)} p(x | z) has no closed
form, so an encoder network q(z | x) = N(mu(x), diag sigma^2(x)) is trained alongside it to
maximise the evidence lower bound (ELBO, Kingma & Welling eq. 3):

    log p(x) >= ELBO(x) = E_{q(z|x)} [ log p(x | z) ]  -  KL( q(z | x) || p(z) )
                          `--- reconstruction ---'      `--- closed form, eq. 10 ---'

The expectation is estimated with one sample z = mu + sigma * eps, eps ~ N(0, I) (the
reparameterisation trick, eq. 4), which makes it differentiable in the encoder's outputs.
After training, the importance-weighted bound (IWAE, Burda et al. 2016) with K samples,

    log p(x) >= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x),

tightens towards log p(x) as K grows and gives the held-out negative log-likelihood estimate.

Two likelihoods p(x | z), each a real probability model of its data:
  bernoulli  for binary pixels: dynamically binarized MNIST (x ~ Bernoulli(pixel) each time a
             digit is seen), the setting of published MNIST NLLs. The decoder outputs logits.
  gaussian   for continuous pixels: uniformly dequantized 8-bit MNIST, x = (k + u)/256,
             u ~ U[0, 1), with N(mean, sigma^2) per pixel, sigma fixed (--sigma 0.1) or learned
             per pixel by the decoder (--sigma learned). Its density bound converts exactly to
             bits/dim on the 8-bit scale, the unit of ddpm.py's bound.

Run:
    python vae.py --data-dir ../shared/mnist --epochs 30                        # MLP, Bernoulli
    python vae.py --arch cnn --likelihood gaussian --out-dir out/vae_cnn_gauss   # CNN, Gaussian
    python vae.py --latent-dim 2 --out-dir out/vae_2d                           # + the 2-D manifold
    python vae.py --eval-only --iw-samples 5000                                 # evaluate out/vae/ckpt.pt
    python vae.py --eval-only --score-samples 1000    # FD etc. of 1000 prior samples (score.py's classifier)

Writes to --out-dir (default out/vae): ckpt.pt (weights, optimizer, step, RNG),
samples_epoch_NNN.png (prior samples), reconstructions.png (inputs over outputs),
interpolation.png, with --latent-dim 2 manifold.png and latent_space.png, and metrics.json
(config, losses, held-out negative ELBO and IWAE NLL in nats, bits/dim, speed).

Reading order: the knobs -> networks -> likelihoods and their data -> reparameterisation and
KL -> ELBO -> IWAE -> bits/dim -> pictures -> training loop -> evaluation -> main(), then the
appendix (command line, device, data, checkpoints, log: plumbing, the same in every script).
All nats and bits are per image unless a name says per dim; log is the natural log.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

D = 28 * 28  # pixels per image: the "dim" of bits/dim


def make_parser():
    p = argparse.ArgumentParser(description="Train or evaluate a VAE on MNIST.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    p.add_argument("--out-dir", default="out/vae", help="checkpoint, pictures, metrics.json")
    p.add_argument("--epochs", type=positive_int, default=50, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training forward pass (default: on for CUDA only)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks (default: on for CUDA only)")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    p.add_argument("--sample-every", type=positive_int, default=5, help="epochs between prior-sample grids")
    p.add_argument("--num-samples", type=positive_int, default=64, help="images per sample grid")
    p.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    p.add_argument("--iw-samples", type=nonneg_int, default=5000,
                   help="K of the IWAE bound for the held-out NLL estimate (0 skips it)")
    p.add_argument("--iw-images", type=nonneg_int, default=1000,
                   help="test images for the IWAE bound (K decoder calls each; 0 skips it)")
    p.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end (also with --eval-only): draw N prior samples and score them with score.py "
                        "(FD, IS, precision/recall; N >= 1000 for FDs that compare); 0: off")
    p.add_argument("--classifier", default="out/classifier/ckpt.pt",
                   help="score.py's digit classifier, for --score-samples")
    # the model
    p.add_argument("--arch", choices=["mlp", "cnn"], default="mlp", help="encoder/decoder networks")
    p.add_argument("--latent-dim", type=positive_int, default=20, help="L, the size of z (2 also draws the manifold)")
    p.add_argument("--hidden-dim", type=positive_int, default=400, help="MLP hidden layer width")
    p.add_argument("--channels", type=positive_int, default=32, help="CNN width: c and 2c channels at 14x14 and 7x7")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli", help="p(x | z)")
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="bernoulli: dynamically binarize the data (default on; without it the nats are "
                        "not a likelihood)")
    p.add_argument("--sigma", type=sigma_value, default=None,
                   help="gaussian: fixed decoder std on the [0, 1] scale, or 'learned' (per pixel, by the "
                        "decoder; the default)")
    p.add_argument("--beta", type=positive_float, default=1.0, help="KL weight (beta-VAE); 1 is the ELBO")
    p.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=False,
                   help="a conditional VAE (Sohn et al. 2015): q(z | x, y) and p(x | z, y) with the digit's label y")
    return p


# ---------------------------------------------------------------------------------------
# 1. Networks: encoder x -> (mu, log sigma^2) of q(z | x), decoder z -> parameters of p(x | z)
# ---------------------------------------------------------------------------------------
# Both architectures have the same interface, so everything below them is shared:
#   encoder: (B, 1, 28, 28) -> (B, 2 * latent_dim)       [mu | log sigma^2], split by VAE.encode
#   decoder: (B, latent_dim) -> (B, out_channels, 28, 28) per-pixel distribution parameters
# The encoder predicts log sigma^2 rather than sigma: it is unconstrained, and exp() keeps
# the variance positive.
# A conditional VAE (--conditional) also gives both networks the label as a one-hot vector
# c (B, 10): the MLPs read [x | c] and [z | c]; the CNN encoder reads c as 10 extra constant
# image channels, the CNN decoder [z | c]. Unconditional networks are called with c = None.

class MLPEncoder(nn.Module):
    """784 -> hidden -> 2L with one ReLU hidden layer (the MNIST model of Kingma & Welling,
    appendix C, with ReLU for tanh). mu and log sigma^2 come out of one Linear: one matmul."""

    def __init__(self, latent_dim, hidden_dim, num_classes=0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(D + num_classes, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 2 * latent_dim))

    def forward(self, x, c=None):
        return self.net(with_label(x.flatten(1), c))  # (Flatten is then a no-op; it keeps the weights' names)


class MLPDecoder(nn.Module):
    """L -> hidden -> out_channels * 784, reshaped to images."""

    def __init__(self, latent_dim, hidden_dim, out_channels, num_classes=0):
        super().__init__()
        self.out_channels = out_channels
        self.net = nn.Sequential(nn.Linear(latent_dim + num_classes, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, out_channels * D))

    def forward(self, z, c=None):
        return self.net(with_label(z, c)).view(-1, self.out_channels, 28, 28)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions halve the resolution twice, then one Linear:
    (B,1,28,28) -> (B,c,14,14) -> (B,2c,7,7) -> (B, 2L).
    A 4x4 kernel with stride 2 and padding 1 maps n to exactly n/2 for even n."""

    def __init__(self, latent_dim, channels, num_classes=0):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1 + num_classes, c, 4, stride=2, padding=1), nn.ReLU(),  # 28 -> 14
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.ReLU(),            # 14 -> 7
            nn.Flatten(), nn.Linear(2 * c * 7 * 7, 2 * latent_dim))

    def forward(self, x, c=None):
        if c is not None:  # the one-hot label as constant planes: (B, 1 + 10, 28, 28)
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)], 1)
        return self.net(x)


class ConvDecoder(nn.Module):
    """The mirror image: Linear to (2c,7,7), then two stride-2 transposed convolutions:
    (B, L) -> (B,2c,7,7) -> (B,c,14,14) -> (B,out_channels,28,28).
    A transposed conv with kernel 4, stride 2, padding 1 gives (n - 1)*2 - 2 + 4 = 2n: exactly
    28 from 7, with no cropping and no output_padding."""

    def __init__(self, latent_dim, channels, out_channels, num_classes=0):
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Linear(latent_dim + num_classes, 2 * c * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(),   # 7 -> 14
            nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1))     # 14 -> 28

    def forward(self, z, c=None):
        return self.net(with_label(z, c))


def with_label(v, c):
    """[v | c]: a (B, n) input with the one-hot label (B, 10) appended; v itself if c is None."""
    return v if c is None else torch.cat([v, c.to(v.dtype)], 1)


# Soft floor of a learned log sigma (VAE.gaussian_params): a pure guard against a runaway
# division. The dequantization noise alone (std 1/256/sqrt(12) = 0.0011, log -6.8) keeps
# useful sigmas above it.
LOG_SIGMA_MIN = -8.0


class VAE(nn.Module):
    """Encoder + decoder + what the decoder's output means (the likelihood).

    Decoder output channels:
      bernoulli:              1, the logits of p(pixel = 1 | z)
      gaussian, fixed sigma:  1, the logits of the mean (mean = sigmoid(.), in (0, 1) like the data)
      gaussian, learned:      2, mean logits and an unconstrained log-sigma per pixel
    encode and decode return float32 even when the networks run in bf16 (autocast), so all
    the math around them (sampling z, the likelihood, the KL, the bounds) is fp32.
    """

    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=400, channels=32,
                 likelihood="bernoulli", sigma="learned", conditional=False):
        super().__init__()
        if arch not in ("mlp", "cnn"):
            raise ValueError(f"unknown arch {arch!r}: use 'mlp' or 'cnn'")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"unknown likelihood {likelihood!r}: use 'bernoulli' or 'gaussian'")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.num_classes = 10 if conditional else 0
        self.likelihood = likelihood
        self.learned_sigma = likelihood == "gaussian" and sigma == "learned"
        # A fixed sigma is a constant of the model, not a weight: it lives in the config, as the
        # text of --sigma ("0.1"; older checkpoints hold the float 0.1, which float() reads too).
        self.fixed_sigma = None if (likelihood == "bernoulli" or self.learned_sigma) else float(sigma)
        out_channels = 2 if self.learned_sigma else 1
        k = self.num_classes
        if arch == "mlp":
            self.encoder = MLPEncoder(latent_dim, hidden_dim, k)
            self.decoder = MLPDecoder(latent_dim, hidden_dim, out_channels, k)
        else:
            self.encoder = ConvEncoder(latent_dim, channels, k)
            self.decoder = ConvDecoder(latent_dim, channels, out_channels, k)

    def one_hot(self, y):
        """Labels (B,) -> one-hot (B, 10) for a conditional VAE; None for an unconditional one."""
        if not self.num_classes:
            if y is not None:
                raise ValueError("this VAE is unconditional: call it without labels")
            return None
        if y is None:
            raise ValueError("this VAE is conditional (a CVAE): it needs the labels y")
        return F.one_hot(y, self.num_classes)

    def encode(self, x, y=None):
        """(B,1,28,28) [, labels (B,)] -> mu, logvar, each (B, L): the parameters of q(z | x[, y])."""
        return self.encoder(x, self.one_hot(y)).float().chunk(2, dim=1)

    def decode(self, z, y=None):
        """(B, L) [, labels (B,)] -> raw decoder output (B, out_channels, 28, 28); see
        log_likelihood / mean."""
        return self.decoder(z, self.one_hot(y)).float()

    def forward(self, x, eps, y=None):
        """The ELBO's pass: q(z | x), the sample z = mu + sigma * eps (sec. 3), its decoding.
        (B,1,28,28), (B, L) [, labels (B,)] -> decoder output, mu, logvar."""
        mu, logvar = self.encode(x, y)
        return self.decode(reparameterize(mu, logvar, eps), y), mu, logvar

    def log_likelihood(self, x, out):
        """log p(x | z) summed over the 784 pixels: (B,1,28,28), (B,C,28,28) -> (B,)."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, out)
        mean, log_sigma = self.gaussian_params(out)
        return gaussian_log_density(x, mean, log_sigma).sum(dim=(1, 2, 3))

    def gaussian_params(self, out):
        """Mean and log sigma of the Gaussian decoder, each (B,1,28,28)."""
        mean = torch.sigmoid(out[:, :1])
        if self.learned_sigma:
            # Soft floor: softplus(r - m) + m ~ r above m = LOG_SIGMA_MIN, -> m below it.
            log_sigma = F.softplus(out[:, 1:] - LOG_SIGMA_MIN) + LOG_SIGMA_MIN
        else:
            log_sigma = torch.full_like(mean, math.log(self.fixed_sigma))
        return mean, log_sigma

    def mean(self, out):
        """The decoder's mean E[x | z] in [0, 1], the picture to show: for Bernoulli the
        probabilities sigmoid(logits), never binary draws."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return self.gaussian_params(out)[0]


MODEL_KEYS = ("arch", "latent_dim", "hidden_dim", "channels", "likelihood", "sigma", "binarize", "conditional")


def build_model(config):
    """The VAE described by a config dict (the argparse namespace, or a checkpoint's)."""
    return VAE(arch=config["arch"], latent_dim=config["latent_dim"], hidden_dim=config["hidden_dim"],
               channels=config["channels"], likelihood=config["likelihood"], sigma=config["sigma"],
               conditional=config.get("conditional", False))  # older checkpoints: unconditional


# ---------------------------------------------------------------------------------------
# 2. Likelihoods p(x | z), and the data each one models
# ---------------------------------------------------------------------------------------

def bernoulli_log_likelihood(x, logits):
    """log p(x | z) = sum_i x_i log p_i + (1 - x_i) log(1 - p_i),  p_i = sigmoid(logits_i).

    Per pixel, -[x log p + (1 - x) log(1 - p)] = softplus(l) - x l, with the gradient
    sigmoid(l) - x (prediction minus target): binary_cross_entropy_with_logits, which computes
    softplus(l) = max(l, 0) + log(1 + e^{-|l|}) so that nothing overflows and the log never
    sees 0. Never sigmoid followed by BCE: that would, for a confident pixel, round p to 1.0 in
    fp32 and return log(0) = -inf (PyTorch then clamps it to -100: a silently wrong gradient).
    A likelihood of binary x only: for grey-scale x it is a cross-entropy, not a log-probability."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3))


def gaussian_log_density(x, mean, log_sigma):
    """log N(x; mean, sigma^2) per element, with the normalising constant:

        log N(x; mu, sigma^2) = -1/2 log(2 pi) - log sigma - (x - mu)^2 / (2 sigma^2)

    Without -log sigma and -1/2 log(2 pi) this is a scaled squared error, not a log-density:
    summed MSE is not a negative log-likelihood and its value depends on the arbitrary scale."""
    return -0.5 * math.log(2 * math.pi) - log_sigma - 0.5 * ((x - mean) * torch.exp(-log_sigma)) ** 2


def to_model_data(images_u8, likelihood, binarize, generator=None):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1], the data each likelihood models.

    bernoulli, binarize:  x ~ Bernoulli(k / 255), a fresh draw each call (dynamic binarization,
                          as in Burda et al. 2016: the model never sees the same binary digit twice)
    bernoulli, no binarize: x = k / 255 (grey levels: trains, but the nats are not a likelihood)
    gaussian:             x = (k + u) / 256, u ~ U[0, 1) fresh each call (uniform dequantization, sec. 5)
    """
    k = images_u8.unsqueeze(1).float()
    if likelihood == "gaussian":
        return (k + torch.rand(k.shape, device=k.device, generator=generator)) / 256
    x = k / 255
    if binarize:
        x = torch.bernoulli(x, generator=generator)
    return x


# ---------------------------------------------------------------------------------------
# 3. The approximate posterior q(z | x): reparameterised sample and KL to the prior
# ---------------------------------------------------------------------------------------

def reparameterize(mu, logvar, eps):
    """z = mu + sigma * eps, eps ~ N(0, I)  (Kingma & Welling eq. 4 / sec. 2.4).

    z ~ N(mu, sigma^2) as required, but the randomness is in eps, which does not depend on the
    encoder, so dz/dmu = 1 and dz/dsigma = eps: gradients flow through the sample."""
    return mu + torch.exp(0.5 * logvar) * eps


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats:

        KL = 1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)

    Against the prior N(0, I) (mean2 = logvar2 = 0) it is Kingma & Welling's appendix B,
    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2): exact, so the KL term of the
    ELBO needs no sampling."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_diag(z, mu, logvar):
    """log N(z; mu, diag e^logvar) summed over the last dim: the densities log q(z|x), log p(z)
    that the IWAE weights need (B..., L) -> (B...)."""
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 * torch.exp(-logvar))).sum(dim=-1)


# ---------------------------------------------------------------------------------------
# 4. The ELBO (training objective) and the IWAE bound (evaluation)
# ---------------------------------------------------------------------------------------

def elbo_terms(model_fn, model, x, eps, y=None):
    """One-sample estimate of the two ELBO terms per image: (B,) reconstruction, (B,) KL.

        recon = -log p(x | z),  z = mu + sigma eps      (a Monte Carlo estimate, eq. 4)
        kl    = KL(q(z | x) || p(z))                    (exact, eq. 10)
        negative ELBO = recon + kl  >=  -log p(x)

    model_fn(x, eps[, y]) -> (out, mu, logvar) is the VAE's forward pass (perhaps compiled, the
    networks perhaps in bf16; its outputs fp32); model.log_likelihood reads the output.
    A conditional VAE (Sohn et al. 2015, eq. 4) with labels y: the same terms with q(z | x, y)
    and p(x | z, y), and p(z | y) = N(0, I): a bound on -log p(x | y)."""
    out, mu, logvar = model_fn(x, eps) if y is None else model_fn(x, eps, y)
    zeros = torch.zeros_like(mu)  # p(z) = N(0, I): mean 0, log variance 0
    return -model.log_likelihood(x, out), normal_kl(mu, logvar, zeros, zeros).sum(dim=1)


def vae_loss(recon, kl, beta):
    """The training loss: mean over the batch of recon + beta * KL, in nats per image.

    beta = 1 is the negative ELBO. beta > 1 (Higgins et al. 2017, beta-VAE) weighs the prior
    more, trading reconstructions for a smoother, more factorised latent space; for beta != 1
    the loss is no longer a bound on -log p(x), so evaluation always reports beta = 1."""
    return (recon + beta * kl).mean()


@torch.no_grad()
def iwae_bound(encode, log_lik, x, k, rows=4096, generator=None):
    """The K-sample importance-weighted bound per image (Burda et al. 2016, eq. 8): (B,) nats.

        L_K(x) = log (1/K) sum_{k=1}^K w_k,   w_k = p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x)
               = logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K

    E[L_1] is the ELBO, E[L_K] <= E[L_{K+1}] <= log p(x), and L_K -> log p(x) as K -> infinity
    (Burda et al. theorem 1), so -L_K with K in the thousands is the usual NLL estimate.

    Memory stays flat in K: the samples are drawn in chunks of about `rows` decoder inputs,
    each chunk is reduced to its own logsumexp (B,), and the chunk results are combined with
    one more logsumexp (logsumexp is associative over a partition of the k's).
    encode(x) -> mu, logvar; log_lik(x, z) -> log p(x | z) for z (B, L) -> (B,)."""
    B = x.shape[0]
    mu, logvar = encode(x)                                        # (B, L): the encoder runs once
    chunk = max(1, rows // B)
    zeros = torch.zeros_like(mu)
    partial = []
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.randn((c,) + mu.shape, device=x.device, generator=generator)  # (c, B, L)
        z = reparameterize(mu, logvar, eps)                          # broadcast over the c samples
        x_rep = x.unsqueeze(0).expand(c, *x.shape).reshape(c * B, *x.shape[1:])
        log_px = log_lik(x_rep, z.reshape(c * B, -1)).view(c, B)    # log p(x | z_k)
        log_pz = log_normal_diag(z, zeros, zeros)                    # log p(z_k), N(0, I)
        log_qz = log_normal_diag(z, mu, logvar)                      # log q(z_k | x)
        partial.append(torch.logsumexp(log_px + log_pz - log_qz, dim=0))  # (B,)
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


# ---------------------------------------------------------------------------------------
# 5. Bits per dimension on the 8-bit scale (Gaussian likelihood)
# ---------------------------------------------------------------------------------------
# The Gaussian decoder is a density, and a density's value depends on the scale of the data:
# the same model on x/2 has log-density larger by D log 2. A scale-free number needs the
# discrete data the density stands for. Here: uniform dequantization (Theis et al. 2016,
# "A note on the evaluation of generative models", sec. 3.1). Pixel level k in {0..255} becomes
# x = (k + u)/256 with u ~ U[0, 1), so each level owns the bin [k/256, (k+1)/256) of width
# 1/256, and for any density p on [0, 1]^D, by Jensen's inequality,
#
#     log P(k) = log int_bin p(x) dx = log E_u[p((k + u)/256)] - D log 256
#              >= E_u[log p(x)] - D log 256.
#
# So  -log2 P(k) / D  <=  (-log p(x) + D log 256) / (D log 2)  =  -log p(x) / (D log 2) + 8,
# in bits per 8-bit pixel, whatever continuous scale x uses (the D log 256 is the log of the
# Jacobian from [0, 1] to the 8-bit scale [0, 256)). Any upper bound on -log p(x) (the negative
# ELBO, the IWAE NLL) stays an upper bound. ddpm.py's bound is on the same quantity (a
# discretized decoder on the 256 levels of [-1, 1]), so the two are directly comparable.

def bits_per_dim_dequantized(nll_nats):
    """Upper bound on the 8-bit discrete NLL in bits/dim from -log p(x) in nats of the
    density of dequantized x = (k + u)/256 in [0, 1]^784 (see above)."""
    return (nll_nats + D * math.log(256)) / (D * math.log(2))


# ---------------------------------------------------------------------------------------
# 6. Pictures: all through net.encode / net.decode; the caller picks the precision (autocast)
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def save_samples(net, path, args, device):
    """Decoder means of --num-samples prior samples z ~ N(0, I), the same z every call (a fixed
    generator), so the grids of successive epochs show the same latent points. A CVAE: one
    row per digit 0..9, num_samples // 10 samples each."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    n, nrow, y = args.num_samples, int(math.ceil(math.sqrt(args.num_samples))), None
    if net.num_classes:
        nrow = max(1, args.num_samples // 10)
        n, y = 10 * nrow, torch.arange(10, device=device).repeat_interleave(nrow)
    z = torch.randn((n, net.latent_dim), device=device, generator=gen)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
        images = net.mean(net.decode(z, y))
    save_image(images.cpu(), path, nrow=nrow)


def score_prior_samples(net, args, device):
    """--score-samples N: the decoder means of N prior draws z ~ N(0, I), as in the grids,
    scored by score.py. A CVAE: the ten digits equally often, and the classifier's accuracy
    on the labels asked for."""
    def draw(n, gen, y=None):
        z = torch.randn((n, net.latent_dim), device=device, generator=gen)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            return net.mean(net.decode(z, None if y is None else y.to(device)))
    labels = torch.arange(args.score_samples) % 10 if net.num_classes else None
    return draw_and_score(args, draw, device, "decoder means of z ~ N(0, I), one decoder pass per sample", labels)


@torch.no_grad()
def save_reconstructions(net, test_data, test_y, path, n=16):
    """Two rows per block: test inputs (as the model sees them: binarized for Bernoulli) over
    the decoder means at the posterior means z = mu(x) (a CVAE: mu(x, y), decoded with y)."""
    x, y = test_data[:2 * n], test_y[:2 * n] if net.num_classes else None
    mu, _ = net.encode(x, y)
    recon = net.mean(net.decode(mu, y))
    rows = [x[:n], recon[:n], x[n:], recon[n:]]
    save_image(torch.cat(rows).cpu(), path, nrow=n)


@torch.no_grad()
def save_interpolation(net, test_data, path, pairs=8, steps=10):
    """Each row walks in a straight line between the posterior means of two test digits,
    z = (1 - a) mu(x1) + a mu(x2), a = 0 .. 1, and shows the decoder means."""
    x = test_data[:2 * pairs]
    mu, _ = net.encode(x)
    a = torch.linspace(0, 1, steps, device=x.device).view(1, steps, 1)
    z = (1 - a) * mu[:pairs, None] + a * mu[pairs:, None]           # (pairs, steps, L)
    save_image(net.mean(net.decode(z.reshape(pairs * steps, -1))).cpu(), path, nrow=steps)


@torch.no_grad()
def save_style(net, test_data, test_y, path, rows=4):
    """A CVAE: what z holds once the label is given. Each row decodes one z with each label
    0..9 (columns 2 to 11). The top rows: z ~ N(0, I) (first column blank); the bottom rows:
    the posterior mean z = mu(x, y) of a test digit x (shown in the first column), that digit's
    style redrawn as every digit."""
    device = test_data.device
    x = test_data[:rows]
    z_prior = torch.randn((rows, net.latent_dim), device=device, generator=torch.Generator(device=device).manual_seed(0))
    z_post, _ = net.encode(x, test_y[:rows])
    z = torch.cat([z_prior, z_post])                                           # (2 rows, L)
    labels = torch.arange(10, device=device).repeat(len(z))                    # 0..9 for each z
    decoded = net.mean(net.decode(z.repeat_interleave(10, dim=0), labels)).view(len(z), 10, 1, 28, 28)
    first = torch.cat([torch.zeros_like(x), x]).view(len(z), 1, 1, 28, 28)
    save_image(torch.cat([first, decoded], 1).reshape(-1, 1, 28, 28).cpu(), path, nrow=11)


@torch.no_grad()
def save_manifold(net, path, n=20):
    """The learned 2-D manifold (Kingma & Welling fig. 4): an n x n grid of points evenly
    spaced on the unit square, mapped through the inverse Gaussian CDF, so each cell covers
    the same prior mass of N(0, I), and decoded to their means."""
    q = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    v = (math.sqrt(2) * torch.erfinv(2 * q - 1)).float()            # Phi^-1(q)
    zy, zx = torch.meshgrid(-v, v, indexing="ij")                   # z_2 grows upwards in the picture
    z = torch.stack([zx.reshape(-1), zy.reshape(-1)], dim=1)
    device = next(net.parameters()).device
    save_image(net.mean(net.decode(z.to(device))).cpu(), path, nrow=n, padding=0)


# Ten distinguishable colours (the "tab10" palette), one per digit class 0..9.
PALETTE = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]) / 255


@torch.no_grad()
def save_latent_space(net, test_data, labels, path, size=280):
    """Where the test digits land in a 2-D latent space, drawn without a plotting library:
    each posterior mean mu(x) is a 3x3 dot in its class colour (PALETTE) on a white canvas.
    The axes are Phi(z) in [0, 1], the coordinates of manifold.png, so both pictures align.
    A strip of ten swatches under the canvas shows the colours of 0, 1, ..., 9 left to right."""
    mu, _ = net.encode(test_data, labels if net.num_classes else None)
    u = 0.5 * (1 + torch.erf(mu.cpu() / math.sqrt(2)))                # Phi(z) in (0, 1)
    col = (u[:, 0] * (size - 3)).long().clamp(0, size - 3)
    row = ((1 - u[:, 1]) * (size - 3)).long().clamp(0, size - 3)
    canvas = torch.ones(3, size + size // 10, size)
    for dy in range(3):
        for dx in range(3):
            canvas[:, row + dy, col + dx] = PALETTE[labels.cpu()].T
    for c in range(10):
        canvas[:, size + 2:, c * size // 10 + 2:(c + 1) * size // 10 - 2] = PALETTE[c].view(3, 1, 1)
    save_image(canvas, path)


def save_pictures(net, test_x, test_y, args, device, prefix=""):
    """Everything drawn at the end of a run (or by --eval-only), the networks in the precision
    of training (bf16 with --amp), on the test digits that evaluate() scores."""
    test_data = eval_data(test_x, args, device)
    # A CVAE draws its style grid in place of the interpolation and the manifold, which would
    # need one label for the whole picture.
    names = ("reconstructions.png", "style.png" if net.num_classes else "interpolation.png")
    paths = [os.path.join(args.out_dir, prefix + name) for name in names]
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
        save_reconstructions(net, test_data, test_y, paths[0])
        if net.num_classes:
            save_style(net, test_data, test_y, paths[1])
        else:
            save_interpolation(net, test_data, paths[1])
        if args.latent_dim == 2 and not net.num_classes:
            paths.append(os.path.join(args.out_dir, prefix + "manifold.png"))
            save_manifold(net, paths[-1])
            paths.append(os.path.join(args.out_dir, prefix + "latent_space.png"))
            save_latent_space(net, test_data, test_y, paths[-1])
    log("wrote " + ", ".join(paths))


# ---------------------------------------------------------------------------------------
# 7. Training
# ---------------------------------------------------------------------------------------

# What --resume takes from the checkpoint: the model, the data order, the objective, the optimizer.
RESUMED_KEYS = MODEL_KEYS + ("seed", "batch_size", "lr", "beta")


def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "vae", RESUMED_KEYS)
    if isinstance(args.sigma, float):  # older checkpoints stored a fixed sigma as a float
        args.sigma = str(args.sigma)
    torch.manual_seed(args.seed)
    train_x, train_y = load_mnist(args.data_dir, train=True, device=device)
    test_x, test_y = load_mnist(args.data_dir, train=False, device=device)
    train_data = torch.cat([train_x.flatten(1), train_y[:, None].to(torch.uint8)], 1)  # a row: 784 pixels, label
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)  # only now: bad input leaves no folder behind
    net = build_model(vars(args)).to(device)
    # Adam (Kingma & Ba 2015) at 1e-3, as in the PyTorch example VAE.
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, fused=fused_adam_ok(device))
    step = restore(ckpt, device, model=net, optimizer=opt) if ckpt else 0
    model_fn = make_model_fn(net, device, args.amp, args.compile)  # x, eps -> out, mu, logvar
    log(run_description(args, net, len(train_x), steps_per_epoch, total_steps, device))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def save():  # no EMA of the weights (ckpt "ema" is None): see finish()
        save_checkpoint(ckpt_path, "vae", args, step, step // steps_per_epoch, device, model=net, ema=None, optimizer=opt)

    meter, t_start, first_step = Meter(step, total_steps, steps_per_epoch, args, device), time.perf_counter(), step
    net.train()
    try:
        while step < total_steps:
            for batch in epoch_batches(train_data, step, steps_per_epoch, args):
                x = to_model_data(batch[:, :784].view(-1, 28, 28), args.likelihood, args.binarize)  # a fresh
                eps = torch.randn(x.shape[0], args.latent_dim, device=device)  # binarization first, then eps
                recon, kl = elbo_terms(model_fn, net, x, eps, batch[:, 784].long() if args.conditional else None)
                loss = vae_loss(recon, kl, args.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                meter.add("loss", recon + args.beta * kl)
                meter.add("recon", recon)
                meter.add("KL", kl)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # a grid every --sample-every epochs and at the end, then the checkpoint
                epoch = step // steps_per_epoch
                if (step % steps_per_epoch == 0 and epoch % args.sample_every == 0) or step >= total_steps:
                    path = os.path.join(args.out_dir, f"samples_epoch_{epoch:03d}.png")
                    save_samples(net.eval(), path, args, device)
                    net.train()
                    log(f"wrote {path}")
                save()  # each epoch, so an interruption loses at most one
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)

    finish(args, device, net, test_x, test_y, meter, first_step, step, steps_per_epoch, time.perf_counter() - t_start)


def finish(args, device, net, test_x, test_y, meter, first_step, step, steps_per_epoch, wall):
    """The end of a run: held-out metrics, the pictures, metrics.json and a summary line. No EMA
    of the weights here: a VAE's samples do not need it, and the held-out bound is for the
    weights that were trained."""
    images_per_sec = meter.images_per_sec((step - first_step) * args.batch_size, wall)
    train_loss = meter.last.get("loss", float("nan"))
    net.eval()
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch,
               "train_loss": train_loss, "train_images_per_sec": images_per_sec,
               "seconds_per_epoch": steps_per_epoch * args.batch_size / images_per_sec if images_per_sec else math.nan,
               "wall_time_s": wall, "device": describe(device), "parameters": sum(p.numel() for p in net.parameters())}
    # Evaluation and pictures use the plain module, not the compiled one: their batch shapes vary
    # (a compiled graph would recompile for each).
    metrics.update(evaluate(make_model_fn(net, device, args.amp), net, test_x, test_y, args, device))
    save_pictures(net, test_x, test_y, args, device)
    if args.score_samples:
        metrics["score"] = score_prior_samples(net, args, device)
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {train_loss:.2f} | {summary(metrics)} "
        f"| {images_per_sec:,.0f} train img/s ({metrics['seconds_per_epoch']:.2f} s/epoch) "
        f"| peak memory {metrics['peak_memory_mb']:.0f} MB")


def run_description(args, net, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the model, the likelihood, the data and the run length."""
    n_params = sum(p.numel() for p in net.parameters())
    data = f" (sigma {args.sigma})" if args.likelihood == "gaussian" else (
        " (binarized)" if args.binarize else " on grey levels: a cross-entropy, not a likelihood")
    return (f"vae: {n_params / 1e6:.3f}M parameters ({args.arch}, latent {args.latent_dim}"
            f"{', conditional on the label' if args.conditional else ''}), {args.likelihood}{data}, "
            f"beta {args.beta} | {n_train} train images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps | device {device.type}, compile={args.compile}, amp={args.amp}"
            + (f" | at the end: {args.score_samples} prior samples scored" if args.score_samples else ""))


# ---------------------------------------------------------------------------------------
# 8. Evaluation on the held-out test split, and main()
# ---------------------------------------------------------------------------------------

def eval_data(test_x, args, device):
    """The test digits as the likelihood's data, drawn once with a fixed generator, so the
    ELBO, the IWAE bound and the pictures see the very same binary / dequantized images."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    return to_model_data(test_x, args.likelihood, args.binarize, generator=gen)


@torch.no_grad()
def evaluate(model_fn, model, test_x, test_y, args, device):
    """Held-out metrics in nats per image (beta = 1: the bound, whatever beta trained):
    negative ELBO = reconstruction + KL over the whole test split, and the IWAE NLL estimate
    -L_K on the first --iw-images digits with K = --iw-samples. Gaussian: also bits/dim.
    model_fn: the forward pass x, eps[, y] -> out, mu, logvar; model: the VAE (likelihood,
    encode, decode); test_x, test_y: the uint8 test images (N, 28, 28) and their labels.
    A conditional VAE is given the true labels: its bounds are on -log p(x | y)."""
    test_data = eval_data(test_x, args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 3)
    batch = max(args.batch_size, 256)

    def labels(i, j):  # the labels of test digits i..j for a CVAE, else None
        return test_y[i:j] if model.num_classes else None

    recon, kl = [], []
    for i in range(0, len(test_data), batch):
        x = test_data[i:i + batch]
        eps = torch.randn((x.shape[0], model.latent_dim), device=device, generator=gen)
        r, k = elbo_terms(model_fn, model, x, eps, labels(i, i + batch))
        recon.append(r)
        kl.append(k)
    recon, kl = torch.cat(recon), torch.cat(kl)
    neg_elbo = recon + kl
    # The mean is the number that bounds the NLL of the test set. The median is also kept: a
    # learned per-pixel sigma can be overconfident on a few test digits (ink where the training
    # digits never had any), whose huge per-image cost then dominates the mean.
    m = {"test_neg_elbo": neg_elbo.mean().item(), "test_recon": recon.mean().item(), "test_kl": kl.mean().item(),
         "test_neg_elbo_median": neg_elbo.median().item(), "test_images": len(test_data),
         "bound_of": "-log p(x | y), true labels" if model.num_classes else "-log p(x)"}
    gaussian = args.likelihood == "gaussian"
    if gaussian:
        m["test_bpd"] = bits_per_dim_dequantized(m["test_neg_elbo"])
    m["data"] = ("dynamically binarized MNIST (test binarized once, fixed seed)" if args.likelihood == "bernoulli"
                 and args.binarize else "uniformly dequantized MNIST x = (k + u)/256 in [0, 1] (test: fixed u)"
                 if gaussian else "grey-level MNIST with a Bernoulli decoder: nats are a cross-entropy, not a NLL")

    n = min(args.iw_images, len(test_data))
    if args.iw_samples > 0 and n > 0:
        K = args.iw_samples
        log(f"IWAE: {n} test images x K = {K} samples = {n * K:,} decoder calls "
            f"(--iw-images, --iw-samples set how many)")
        t0 = time.perf_counter()
        group = 16  # images per IWAE call; each call draws K samples in chunks of ~4096 rows

        def bound(i, j):  # iwae_bound of test digits i..j: encode x -> mu, logvar; log p(x | z) from z
            y = labels(i, j)  # the K samples of z are stacked sample-major, so row r has label y[r % B]
            return iwae_bound(lambda x: model.encode(x, y),
                              lambda x, z: model.log_likelihood(x, model.decode(z, None if y is None else y.repeat(len(z) // len(y)))),
                              test_data[i:j], K, generator=gen)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # the networks as model_fn runs them
            bounds = torch.cat([bound(i, min(i + group, n)) for i in range(0, n, group)])
        m.update({"test_iwae_nll": -bounds.mean().item(), "test_iwae_k": K, "test_iwae_images": n,
                  "test_neg_elbo_iwae_images": neg_elbo[:n].mean().item()})
        if gaussian:
            m["test_iwae_bpd"] = bits_per_dim_dequantized(m["test_iwae_nll"])
        log(f"IWAE: {m['test_iwae_nll']:.2f} nats (negative ELBO on the same {n} images "
            f"{m['test_neg_elbo_iwae_images']:.2f}) in {time.perf_counter() - t0:.1f}s")
    return m


def summary(m):
    """One line of the held-out numbers."""
    s = (f"test -ELBO {m['test_neg_elbo']:.2f} nats (recon {m['test_recon']:.2f} + KL {m['test_kl']:.2f}, "
         f"median {m['test_neg_elbo_median']:.2f})")
    if "test_iwae_nll" in m:
        s += f" | IWAE NLL {m['test_iwae_nll']:.2f} nats (K={m['test_iwae_k']}, {m['test_iwae_images']} images)"
    if "test_bpd" in m:
        s += f" | {m['test_bpd']:.3f} bits/dim (ELBO)"
    if "test_iwae_bpd" in m:
        s += f", {m['test_iwae_bpd']:.3f} (IWAE)"
    if "fd" in m.get("score", {}):
        s += f" | FD {m['score']['fd']:.2f} ({m['score']['n']} samples)"
    return s


def eval_only(args):
    """Evaluate out-dir/ckpt.pt: held-out negative ELBO, IWAE NLL, bits/dim, and the pictures."""
    device = setup(args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "vae")
    for key in MODEL_KEYS + ("seed",):
        setattr(args, key, ckpt["config"][key])
    net = build_model(ckpt["config"]).to(device).eval()
    net.load_state_dict(ckpt["model"])
    test_x, test_y = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {ckpt_path} (step {ckpt['step']})")
    metrics = {"checkpoint": ckpt_path, "step": ckpt["step"], "device": describe(device)}
    metrics.update(evaluate(make_model_fn(net, device, args.amp), net, test_x, test_y, args, device))
    save_samples(net, os.path.join(args.out_dir, "eval_samples.png"), args, device)
    save_pictures(net, test_x, test_y, args, device, prefix="eval_")
    if args.score_samples:
        metrics["score"] = score_prior_samples(net, args, device)
    log(summary(metrics))
    write_json(metrics, os.path.join(args.out_dir, "eval.json"))


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        eval_only(args)
    else:
        train(args)


# =======================================================================================
# Appendix: plumbing. Nothing below this line is about the model.
# =======================================================================================
# The same helpers, in the same order, close every training script of this project: the
# command line, device and precision, data, random state and checkpoints, the log.


CKPT_VERSION = 1


def parse_args(argv=None):
    """The knobs at the top of the file, read from the command line; bad input is one line."""
    parser = make_parser()
    parser.prog, parser.error = os.path.basename(__file__), fail  # argparse's own errors as one line too
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Each likelihood has its own knob; one given to the other would be silently ignored."""
    if args.likelihood == "bernoulli":
        if args.sigma is not None:
            fail("--sigma applies to --likelihood gaussian")
        args.binarize = True if args.binarize is None else args.binarize
    else:
        if args.binarize is not None:
            fail("--binarize / --no-binarize apply to --likelihood bernoulli (gaussian data are dequantized)")
        args.binarize = False
        args.sigma = "learned" if args.sigma is None else args.sigma
    check_classifier(args)


def number_at_least(convert, minimum, strict=False):
    """An argparse type: a finite int or float that is >= minimum (> if strict)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind} {'>' if strict else '>='} {minimum}, got {text!r}")
        return value
    return parse


positive_int = number_at_least(int, 1)
nonneg_int = number_at_least(int, 0)
positive_float = number_at_least(float, 0, strict=True)


def sigma_value(text):
    """--sigma: 'learned', or a fixed positive standard deviation, kept as the text given
    (one type, str, in args and in checkpoints; the VAE converts it with float())."""
    if text != "learned":
        try:
            positive_float(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected 'learned' or a positive number, got {text!r}")
    return text


def make_out_dir(path):
    """Create --out-dir once all input is checked (bad input leaves no folder) and prove it writable."""
    try:
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, ".write_test"), "w").close()
        os.remove(os.path.join(path, ".write_test"))
    except OSError as e:
        fail(f"cannot write to --out-dir {path}: {e.strerror or e}")


def setup(args):
    """The device, and what depends on it: compile and bf16 default on for CUDA only, TF32 on."""
    device = get_device(args.device)
    args.compile = (device.type == "cuda") if args.compile is None else args.compile
    args.amp = (device.type == "cuda") if args.amp is None else args.amp
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def get_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not torch.backends.mps.is_available()):
        fail(f"--device {name} asked, but it is not available")
    return torch.device(name)


def make_model_fn(net, device, amp, compile=False):
    """net(*inputs), torch.compile'd if asked, in bf16 autocast if amp, with the output(s) back
    in float32, so that all the math around the network stays fp32."""
    run = torch.compile(net) if compile else net

    def model_fn(*inputs):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = run(*inputs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
    return model_fn


def fused_adam_ok(device):
    return device.type in ("cuda", "cpu")  # one kernel for the whole update (CPU since torch 2.4)


def describe(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else device.type


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def save_image(images, path, **grid_options):
    """torchvision's save_image (a grid PNG; options as make_grid's), imported on first use:
    `import torchvision` is half of a script's start-up (3.5 of 7 s on a 2-core CPU), which
    --help and a bad flag need not pay."""
    from torchvision.utils import save_image as write_png
    write_png(images, path, **grid_options)


def load_mnist(data_dir, train, device):
    """MNIST as whole uint8 tensors on the device: images (N, 28, 28), labels (N,)."""
    import torchvision  # here, not at the top: see save_image
    try:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:  # offline, or a broken folder: one clear line, not a traceback
        fail(f"could not load MNIST ({type(e).__name__}). Offline? Put train-images-idx3-ubyte, "
             f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in "
             f"{os.path.join(data_dir, 'MNIST', 'raw')}/ or point --data-dir at a folder that has them")
    return ds.data.to(device), ds.targets.to(device)


def run_length(args, n_train):
    """(steps per epoch, total steps). Full batches only, so step -> (epoch, batch) is exact."""
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({n_train} images)")
    return steps_per_epoch, min(args.epochs * steps_per_epoch, args.max_steps or math.inf)


def epoch_batches(images, step, steps_per_epoch, args):
    """The rest of the epoch that `step` is in, as uint8 batches, in an order seeded by (seed,
    epoch): a resumed run sees exactly the batches of an uninterrupted one."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step // steps_per_epoch)
    perm = torch.randperm(len(images), generator=g).to(images.device)
    for i in range(step % steps_per_epoch, steps_per_epoch):  # index_select: ~7x faster than [] on CPU
        yield images.index_select(0, perm[i * args.batch_size:(i + 1) * args.batch_size])


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type in ("cuda", "mps"):
        state[device.type] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type in ("cuda", "mps") and device.type in state:
        getattr(torch, device.type).set_rng_state(state[device.type])


def start_or_resume(args, kind, resumed_keys):
    """--resume: the checkpoint in --out-dir, whose resumed_keys (the model, the data order, the
    optimizer's settings) replace the command line's. Else None, and never overwrite one."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(path):
            fail(f"{path} exists: pass --resume to continue that run, or --out-dir for a new one")
        return None
    ckpt = load_checkpoint(path, kind)
    for key in set(resumed_keys) & set(ckpt["config"]):
        setattr(args, key, ckpt["config"][key])
    return ckpt


def restore(ckpt, device, **objects):
    """Load each object (model=, ema=, optimizer=) from its key and the RNG; return the step."""
    for key, obj in objects.items():
        obj.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"], device)
    log(f"resumed at step {ckpt['step']} (epoch {ckpt['epoch']})")
    return ckpt["step"]


def save_checkpoint(path, kind, args, step, epoch, device, **objects):
    """Plain data (loads with weights_only=True), written atomically: a crash mid-save keeps the old one.
    objects: modules and optimizers (stored as their state_dict), or plain numbers."""
    state = {"kind": kind, "version": CKPT_VERSION, "config": vars(args), "step": step, "epoch": epoch,
             "rng": rng_state(device),
             **{k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in objects.items()}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, kind):
    """A checkpoint of this kind, loaded as data (weights_only=True: no code in it runs)."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        fail(f"{path} is not a {kind} checkpoint (kind: {ckpt.get('kind') if isinstance(ckpt, dict) else None!r})")
    if ckpt.get("version", 0) > CKPT_VERSION:
        fail(f"{path} has checkpoint format {ckpt['version']}, newer than this script's {CKPT_VERSION}")
    return ckpt


class Meter:
    """The log line. Per-image losses are summed on the device and read once per line (a sync
    every step would stall a GPU): each figure is a mean since the last line, per group if
    asked. images/s leaves out the first interval (compile, warm-up) and time in paused().
    note: images/s -> an extra figure for the line (ddpm.py: MFU on a GPU), or None."""

    def __init__(self, step, total_steps, steps_per_epoch, args, device, budget_s=None, note=None):
        self.total, self.per_epoch, self.batch, self.every = total_steps, steps_per_epoch, args.batch_size, args.log_every
        self.device, self.sums, self.last, self.first = device, {}, {}, True
        self.t_log, self.step_log, self.steady_time, self.steady_images = time.perf_counter(), step, 0.0, 0
        self.t_start, self.paused_time, self.pause_start = self.t_log, 0.0, None
        self.budget_s, self.note = budget_s, note  # training seconds left, or None

    def add(self, name, values, group=None, groups=1):
        if name not in self.sums:  # row 0: sums, row 1: counts
            self.sums[name] = torch.zeros(2, groups, device=self.device)
        sums, counts = self.sums[name]
        if group is None:
            sums += values.detach().float().sum()
            counts += len(values)
        else:
            sums.index_add_(0, group, values.detach().float())
            counts.index_add_(0, group, torch.ones_like(values, dtype=torch.float))

    def tick(self, step):
        if step % self.every and step != self.total:
            return
        means = {k: (s[0] / s[1].clamp(min=1)).tolist() for k, s in self.sums.items()}  # the one host sync
        for s in self.sums.values():
            s.zero_()
        self.last = {k: m[0] if len(m) == 1 else m for k, m in means.items()}
        now, images = time.perf_counter(), (step - self.step_log) * self.batch
        if not self.first:
            self.steady_time, self.steady_images = self.steady_time + now - self.t_log, self.steady_images + images
        speed, self.first = images / max(now - self.t_log, 1e-9), False
        figures = " | ".join(k + "".join(f" {v:.4f}" if abs(v) < 10 else f" {v:.2f}" for v in m) for k, m in means.items())
        eta = (self.total - step) * self.batch / speed
        if self.budget_s is not None:
            eta = min(eta, max(0.0, self.budget_s - self.training_seconds()))
        log(f"step {step}/{self.total} | epoch {step / self.per_epoch:.2f} | {figures} | {speed:,.0f} img/s "
            + (f"| {self.note(speed)} " if self.note else "") + f"| eta {eta / 60:.1f} min")
        self.t_log, self.step_log = now, step

    @contextlib.contextmanager
    def paused(self):
        self.pause_start = time.perf_counter()
        yield
        pause, self.pause_start = time.perf_counter() - self.pause_start, None
        self.t_log, self.paused_time = self.t_log + pause, self.paused_time + pause

    def training_seconds(self):
        """Time since this meter started, less the time in paused() (inside it: up to its start)."""
        return (self.pause_start or time.perf_counter()) - self.t_start - self.paused_time

    def images_per_sec(self, images, wall):
        """Steady training throughput; before the second log line, all images over the wall time."""
        return self.steady_images / self.steady_time if self.steady_time > 0 else images / max(wall, 1e-9)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def check_classifier(args):
    """--score-samples needs score.py beside this script and a trained digit classifier:
    checked before anything runs, so a long run cannot end without the score it was asked for."""
    if not args.score_samples:
        return
    try:
        import score  # noqa: F401 (only with --score-samples: each script runs without score.py)
    except ImportError:
        fail("--score-samples needs score.py, this project's sample scorer, beside this script")
    if not os.path.isfile(args.classifier):
        fail(f"--score-samples needs a digit classifier at {args.classifier}: train one with `python score.py "
             f"--train-classifier --data-dir {args.data_dir}` (about a minute on 2 CPU cores) or pass --classifier")


@torch.no_grad()
def draw_and_score(args, draw, device, cost, labels=None):
    """--score-samples N: draw N samples with draw(n, generator) -> (n, 1, 28, 28) in [0, 1], in
    batches of 256 from a fixed generator, and score them with score.py against as many real
    test digits. Announces the cost, then the time to go after the first batch. With labels
    (N intended classes) draw(n, generator, labels of the batch), and the score has the
    classifier's accuracy on them."""
    import score
    n, batch = args.score_samples, 256
    log(f"score: drawing {n} samples ({cost}), then scoring them with {args.classifier}")
    gen = torch.Generator(device=device).manual_seed(args.seed + 3)
    t0, parts = time.perf_counter(), []
    for i in range(0, n, batch):
        images = draw(min(batch, n - i), gen) if labels is None else draw(min(batch, n - i), gen, labels[i:i + batch])
        parts.append(images.float().clamp(0, 1).cpu())
        if i == 0 and n > batch:
            spent = time.perf_counter() - t0
            log(f"score: {batch} samples in {spent:.1f}s, about {spent * (n - batch) / batch / 60:.1f} min to go")
    seconds, x = time.perf_counter() - t0, torch.cat(parts)
    problem = score.sample_problem(x)
    if problem:  # a diverged model: say so, keep the rest of the metrics
        log(f"score: not scored: {problem}")
        return {"n": n, "error": problem}
    result = {**score.score_samples(x, args.classifier, args.data_dir, device, seed=args.seed, labels=labels),
              "sampling": cost, "sample_seconds": seconds}
    log(f"score: FD {result['fd']:.2f} | IS {result['is']:.2f} | precision {result['precision']:.3f} | recall "
        f"{result['recall']:.3f}" + (f" | accuracy on the labels {result['accuracy']:.3f}" if labels is not None else "")
        + f" | {n} samples vs {result['n_real']} real test digits (compare FDs at equal N)")
    return result


def fail(message):
    """Stop with one clear line on stderr: bad input is not a traceback."""
    print(f"{os.path.basename(__file__)}: error: {message}", file=sys.stderr)
    sys.exit(2)


def log(msg):
    if os.environ.get("RANK", "0") == "0":  # under torchrun (ddpm.py), rank 0 speaks for all
        print(msg, flush=True)


if __name__ == "__main__":
    main()
