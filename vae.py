"""
vae.py: the Variational Autoencoder (Kingma & Welling 2014) on MNIST, from scratch, in one file.

A latent-variable model p(x, z) = p(z) p(x | z), p(z) = N(0, I), with a decoder network for
p(x | z). Its log-likelihood log p(x) = log E_{p(z)} p(x | z) has no closed form, so an encoder
network q(z | x) = N(mu(x), diag sigma^2(x)) is trained alongside it to maximise the evidence
lower bound (ELBO, Kingma & Welling eq. 3):

    log p(x) >= ELBO(x) = E_{q(z|x)} [ log p(x | z) ]  -  KL( q(z | x) || p(z) )
                          `--- reconstruction ---'      `--- closed form, eq. 10 ---'

estimated with one sample z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation trick,
eq. 4), which is differentiable in the encoder's outputs. After training, the importance-
weighted bound with K samples (IWAE, Burda et al. 2016), a held-out NLL estimate,

    log p(x) >= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),   z_k ~ q(z | x),

tightens towards log p(x) as K grows.

What `python vae.py` runs: MLP encoder and decoder (400 hidden units), a 20-d z, a Bernoulli
p(x | z) on dynamically binarized MNIST (x ~ Bernoulli(pixel) each time a digit is seen: the
setting of published MNIST NLLs), 50 epochs of Adam (lr 1e-3, batch 128); then the negative
ELBO on the test split and the IWAE NLL with K = 5000 on 1000 test digits, in nats per digit.
--likelihood gaussian models dequantized pixels x = (k + u)/256 with N(mean, sigma^2) per pixel
(sigma learned, or fixed by --sigma), a bound in bits/dim like ddpm.py's; --class-cond gives
both networks the digit's label (a conditional VAE).

    python vae.py --data-dir ../shared/mnist --epochs 30                        # the defaults, 30 epochs
    python vae.py --arch cnn --likelihood gaussian --out-dir out/vae_cnn_gauss   # CNN, Gaussian
    python vae.py --latent-dim 2 --out-dir out/vae_2d                           # + the 2-D manifold
    python vae.py --eval-only --iw-samples 5000                                 # evaluate out/vae/ckpt.pt

Writes to --out-dir (default out/vae): ckpt.pt, samples_epoch_NNN.png (prior samples), reconstructions.png,
interpolation.png (--class-cond: style.png; --latent-dim 2: manifold.png, latent_space.png too), metrics.json.
Below: the knobs, the model and its math, train(), evaluate(), main(); then the extensions, this script's
run plumbing and the appendix. log is natural; nats are per image.
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
                                formatter_class=HelpFormatter)
    p.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    p.add_argument("--out-dir", default="out/vae", help="checkpoint, pictures, metrics.json")
    p.add_argument("--epochs", type=positive_int, default=50, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    onoff = argparse.BooleanOptionalAction  # --x / --no-x; None: decided in check_args or setup
    p.add_argument("--compile", action=onoff, default=False,
                   help="torch.compile the training forward pass: for long runs (a cold compile costs about a minute)")
    p.add_argument("--amp", action=onoff, help="bf16 autocast for the networks (default: on CUDA only)")
    p.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    p.add_argument("--sample-every", type=positive_int, default=5, help="epochs between prior-sample grids")
    p.add_argument("--num-samples", type=positive_int, default=64, help="images per sample grid")
    p.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    p.add_argument("--iw-samples", type=nonneg_int, default=5000, help="K of the held-out IWAE bound (0 skips it)")
    p.add_argument("--iw-images", type=nonneg_int, default=1000, help="test images for the IWAE bound (0 skips it)")
    p.add_argument("--score-samples", type=nonneg_int, default=0, help="score N prior samples with score.py at the end")
    p.add_argument("--classifier", default="out/classifier/ckpt.pt", help="score.py's digit classifier")
    # the model
    p.add_argument("--arch", choices=["mlp", "cnn"], default="mlp", help="encoder/decoder networks")
    p.add_argument("--latent-dim", type=positive_int, default=20, help="L, the size of z (2 also draws the manifold)")
    p.add_argument("--hidden-dim", type=positive_int, default=400, help="MLP hidden layer width")
    p.add_argument("--channels", type=positive_int, default=32, help="CNN width: c and 2c channels at 14x14 and 7x7")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli", help="p(x | z)")
    p.add_argument("--binarize", action=onoff, help="bernoulli: binarize the data afresh (default on; off: not a NLL)")
    p.add_argument("--sigma", help="gaussian: a fixed decoder std on the [0, 1] scale, or 'learned' (default)")
    p.add_argument("--beta", type=positive_float, default=1.0, help="KL weight (beta-VAE); 1 is the ELBO")
    p.add_argument("--class-cond", action=onoff, default=False, help="a conditional VAE on the digit label (Sohn 2015)")
    return p


# ---------------- 1. Networks: encoder x -> q(z | x), decoder z -> p(x | z) -----------------
# Both architectures have the same interface, so everything below them is shared:
#   encoder: (B, 1, 28, 28) -> (B, 2L), [mu | log_var];  decoder: (B, L) -> (B, C, 28, 28)
# The encoder predicts log_var = log sigma^2, not sigma: it is unconstrained, and exp() keeps the
# variance positive. A conditional VAE (--class-cond) also gives both networks the label as a
# one-hot c (B, 10): the MLPs read [x | c] and [z | c]; the CNN encoder reads c as 10 constant
# image channels, the CNN decoder [z | c] (VAE.encode and VAE.decode put it there).

def make_networks(arch, latent_dim, hidden_dim, channels, out_channels, num_classes):
    """(encoder, decoder); num_classes: the size of the one-hot label they also read (0: none).
    mlp: 784 -> hidden -> 2L and L -> hidden -> out_channels x 784, one ReLU hidden layer each
         (the shape of Kingma & Welling's MNIST model, appendix C, with ReLU for tanh; they used
         500 hidden units on MNIST, section 5: --hidden-dim defaults to pytorch/examples' 400).
    cnn: two stride-2 convolutions and a Linear, (B,1,28,28) -> (B,c,14,14) -> (B,2c,7,7) -> (B, 2L),
         and the mirror image. Kernel 4, stride 2, padding 1 maps n to exactly n/2, and transposed
         to (n - 1)*2 - 2 + 4 = 2n: 28 -> 14 -> 7 -> 14 -> 28, no cropping, no output_padding."""
    L, h, c, k = latent_dim, hidden_dim, channels, num_classes
    if arch == "mlp":  # mu and log_var come out of one Linear: one matmul
        return (nn.Sequential(nn.Linear(D + k, h), nn.ReLU(), nn.Linear(h, 2 * L)),
                nn.Sequential(nn.Linear(L + k, h), nn.ReLU(), nn.Linear(h, out_channels * D),
                              nn.Unflatten(1, (out_channels, 28, 28))))
    encoder = nn.Sequential(
        nn.Conv2d(1 + k, c, 4, stride=2, padding=1), nn.ReLU(),              # 28 -> 14
        nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.ReLU(),              # 14 -> 7
        nn.Flatten(), nn.Linear(2 * c * 7 * 7, 2 * L))
    decoder = nn.Sequential(
        nn.Linear(L + k, 2 * c * 7 * 7), nn.ReLU(), nn.Unflatten(1, (2 * c, 7, 7)),
        nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(),     # 7 -> 14
        nn.ConvTranspose2d(c, out_channels, 4, stride=2, padding=1))         # 14 -> 28
    return encoder, decoder


# Soft floor of a learned log_std (VAE.gaussian_params): a pure guard against a runaway division.
# The dequantization noise alone (std 1/256/sqrt(12) = 0.0011, log -6.8) keeps useful sigmas above it.
LOG_STD_MIN = -8.0


class VAE(nn.Module):
    """Encoder + decoder + what the decoder's output means (the likelihood). Output channels:
      bernoulli:              1, the logits of p(pixel = 1 | z)
      gaussian, fixed sigma:  1, the logits of the mean (mean = sigmoid(.), in (0, 1) like the data)
      gaussian, learned:      2, mean logits and an unconstrained log_std per pixel
    encode and decode return float32 even when the networks run in bf16 (autocast), so all
    the math around them (sampling z, the likelihood, the KL, the bounds) is fp32."""

    def __init__(self, arch="mlp", latent_dim=20, hidden_dim=400, channels=32,
                 likelihood="bernoulli", sigma="learned", class_cond=False):
        super().__init__()
        if arch not in ("mlp", "cnn") or likelihood not in ("bernoulli", "gaussian") or latent_dim < 1:
            raise ValueError(f"no such VAE: arch {arch!r} (mlp, cnn), likelihood {likelihood!r} "
                             f"(bernoulli, gaussian), latent_dim {latent_dim} (>= 1)")
        self.latent_dim, self.likelihood, self.num_classes = latent_dim, likelihood, 10 if class_cond else 0
        self.learned_sigma = likelihood == "gaussian" and sigma == "learned"
        # A fixed sigma is a constant of the model, not a weight: it lives in the config, as the text of --sigma.
        self.fixed_sigma = None if (likelihood == "bernoulli" or self.learned_sigma) else float(sigma)
        self.arch, out_ch = arch, 2 if self.learned_sigma else 1  # mean logits [| log_std]
        self.encoder, self.decoder = make_networks(arch, latent_dim, hidden_dim, channels, out_ch, self.num_classes)

    def one_hot(self, y):
        """Labels (B,) -> one-hot (B, 10) for a conditional VAE; None (and no labels) for an unconditional one."""
        if (y is None) == bool(self.num_classes):
            raise ValueError("this VAE is conditional (a CVAE): it needs the labels y" if self.num_classes
                             else "this VAE is unconditional: call it without labels")
        return F.one_hot(y, self.num_classes) if self.num_classes else None

    def encode(self, x, y=None):
        """(B,1,28,28) [, labels (B,)] -> mu, log_var, each (B, L): the parameters of q(z | x[, y])."""
        c = self.one_hot(y)
        if self.arch == "mlp":
            x = x.flatten(1) if c is None else torch.cat([x.flatten(1), c.to(x.dtype)], 1)  # [x | c]
        elif c is not None:  # the one-hot label as constant planes: (B, 1 + 10, 28, 28)
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:]).to(x.dtype)], 1)
        return self.encoder(x).float().chunk(2, dim=1)

    def decode(self, z, y=None):
        """(B, L) [, labels (B,)] -> raw decoder output (B, out_channels, 28, 28): see log_likelihood, mean."""
        c = self.one_hot(y)
        return self.decoder(z if c is None else torch.cat([z, c.to(z.dtype)], 1)).float()  # [z | c]

    def forward(self, x, eps, y=None):
        """The ELBO's pass: q(z | x), the sample z = mu + sigma * eps, its decoding -> out, mu, log_var."""
        mu, log_var = self.encode(x, y)
        return self.decode(reparameterize(mu, log_var, eps), y), mu, log_var

    def log_likelihood(self, x, out):
        """log p(x | z) summed over the 784 pixels: (B,1,28,28), (B,C,28,28) -> (B,)."""
        if self.likelihood == "bernoulli":
            return bernoulli_log_likelihood(x, out)
        mean, log_std = self.gaussian_params(out)
        return gaussian_log_density(x, mean, log_std).sum(dim=(1, 2, 3))

    def gaussian_params(self, out):
        """Mean and log_std of the Gaussian decoder, each (B,1,28,28)."""
        mean = torch.sigmoid(out[:, :1])
        if self.learned_sigma:  # soft floor: softplus(r - m) + m ~ r above m = LOG_STD_MIN, -> m below it
            return mean, F.softplus(out[:, 1:] - LOG_STD_MIN) + LOG_STD_MIN
        return mean, torch.full_like(mean, math.log(self.fixed_sigma))

    def mean(self, out):
        """E[x | z] in [0, 1], the picture to show: for Bernoulli sigmoid(logits), never binary draws."""
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else self.gaussian_params(out)[0]

    @torch.no_grad()
    def sample(self, n, generator=None, y=None):
        """The generative model run forward: z ~ p(z) = N(0, I), then the mean of p(x | z[, y]): (n, 1, 28, 28)."""
        z = torch.randn((n, self.latent_dim), device=next(self.parameters()).device, generator=generator)
        return self.mean(self.decode(z, y))


MODEL_KEYS = ("arch", "latent_dim", "hidden_dim", "channels", "likelihood", "sigma", "binarize", "class_cond")


def build_model(config):
    """The VAE described by a config dict (vars(args), or a checkpoint's): MODEL_KEYS but binarize (the data's)."""
    return VAE(**{key: config[key] for key in MODEL_KEYS if key != "binarize"})


# ------------------ 2. Likelihoods p(x | z), and the data each one models -------------------

def bernoulli_log_likelihood(x, logits):
    """log p(x | z) = sum_i x_i log p_i + (1 - x_i) log(1 - p_i),  p_i = sigmoid(logits_i).

    Per pixel, -[x log p + (1 - x) log(1 - p)] = softplus(l) - x l, with the gradient
    sigmoid(l) - x (prediction minus target): binary_cross_entropy_with_logits, which computes
    softplus(l) = max(l, 0) + log(1 + e^{-|l|}) so that nothing overflows and the log never
    sees 0. Never sigmoid followed by BCE: that would, for a confident pixel, round p to 1.0 in
    fp32 and return log(0) = -inf (PyTorch then clamps it to -100: a silently wrong gradient).
    A likelihood of binary x only: for grey-scale x it is a cross-entropy, not a log-probability."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3))


def gaussian_log_density(x, mean, log_std):
    """log N(x; mean, sigma^2) per element, with the normalising constant:

        log N(x; mu, sigma^2) = -1/2 log(2 pi) - log sigma - (x - mu)^2 / (2 sigma^2)

    Without -log sigma and -1/2 log(2 pi) this is a scaled squared error, not a log-density:
    summed MSE is not a negative log-likelihood and its value depends on the arbitrary scale."""
    return -0.5 * math.log(2 * math.pi) - log_std - 0.5 * ((x - mean) * torch.exp(-log_std)) ** 2


def to_model_range(images_u8):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1], this chapter's range: the grey levels k / 255."""
    return images_u8.unsqueeze(1).float() / 255


def binarize(x, generator=None):
    """Dynamic binarization (as in Burda et al. 2016): x ~ Bernoulli(grey level), a fresh draw each
    call, so the model never sees the same binary digit twice. The data of the Bernoulli likelihood."""
    return torch.bernoulli(x, generator=generator)


def dequantize(images_u8, generator=None):
    """Uniform dequantization (section 5): level k -> x = (k + u) / 256, u ~ U[0, 1) fresh each call,
    uint8 (B, 28, 28) -> float (B, 1, 28, 28) in [0, 1). The data of the Gaussian likelihood."""
    k = images_u8.unsqueeze(1).float()
    return (k + torch.rand(k.shape, device=k.device, generator=generator)) / 256


def likelihood_data(images_u8, likelihood, binarized, generator=None):
    """uint8 (B, 28, 28) -> the data (B, 1, 28, 28) the likelihood models. bernoulli: binarized grey
    levels, or with --no-binarize the grey levels themselves (it trains, but the nats are a
    cross-entropy, not a likelihood); gaussian: dequantized levels."""
    if likelihood == "gaussian":
        return dequantize(images_u8, generator)
    x = to_model_range(images_u8)
    return binarize(x, generator) if binarized else x


# ---------- 3. The approximate posterior q(z | x): its sample, its KL to the prior ----------

def reparameterize(mu, log_var, eps):
    """z = mu + sigma * eps, eps ~ N(0, I)  (Kingma & Welling eq. 4 / sec. 2.4).

    z ~ N(mu, sigma^2) as required, but the randomness is in eps, which does not depend on the
    encoder, so dz/dmu = 1 and dz/dsigma = eps: gradients flow through the sample."""
    return mu + torch.exp(0.5 * log_var) * eps


# KL = 1/2 (-1 + log_var2 - log_var1 + e^(log_var1 - log_var2) + (mean1 - mean2)^2 e^-log_var2).
# Against the prior N(0, I) (mean2 = log_var2 = 0) it is Kingma & Welling's appendix B,
# -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2): exact, so the ELBO's KL needs no sampling.
def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def log_normal_diag(z, mu, log_var):
    """log N(z; mu, diag e^log_var) summed over the last dim, (B..., L) -> (B...): the densities
    log q(z | x) and log p(z) of the IWAE weights."""
    return (-0.5 * (math.log(2 * math.pi) + log_var + (z - mu) ** 2 * torch.exp(-log_var))).sum(dim=-1)


# ------------- 4. The ELBO (training objective) and the IWAE bound (evaluation) -------------

def elbo_terms(model_fn, model, x, eps, y=None):
    """One-sample estimate of the two ELBO terms per image: (B,) reconstruction, (B,) KL.

        recon = -log p(x | z),  z = mu + sigma eps      (a Monte Carlo estimate, eq. 4)
        kl    = KL(q(z | x) || p(z))                    (exact, eq. 10)
        negative ELBO = recon + kl  >=  -log p(x)

    model_fn(x, eps[, y]) -> (out, mu, log_var) is the VAE's forward pass (perhaps compiled, the
    networks perhaps in bf16; its outputs fp32); model.log_likelihood reads the output.
    A conditional VAE (Sohn et al. 2015, eq. 4) with labels y: the same terms with q(z | x, y)
    and p(x | z, y), and p(z | y) = N(0, I): a bound on -log p(x | y)."""
    out, mu, log_var = model_fn(x, eps) if y is None else model_fn(x, eps, y)
    zeros = torch.zeros_like(mu)  # p(z) = N(0, I): mean 0, log variance 0
    return -model.log_likelihood(x, out), normal_kl(mu, log_var, zeros, zeros).sum(dim=1)


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
    Memory stays flat in K: the samples are drawn in chunks of about `rows` decoder inputs, each
    chunk reduced to its own logsumexp (B,), and the chunks combined with one more logsumexp.
    encode(x) -> mu, log_var; log_lik(x, z) -> log p(x | z) for z (B, L) -> (B,)."""
    B = x.shape[0]
    mu, log_var = encode(x)                                       # (B, L): the encoder runs once
    chunk, zeros, partial = max(1, rows // B), torch.zeros_like(mu), []
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.randn((c,) + mu.shape, device=x.device, generator=generator)  # (c, B, L)
        z = reparameterize(mu, log_var, eps)                         # broadcast over the c samples
        x_rep = x.unsqueeze(0).expand(c, *x.shape).reshape(c * B, *x.shape[1:])
        log_px = log_lik(x_rep, z.reshape(c * B, -1)).view(c, B)    # log p(x | z_k)
        log_pz = log_normal_diag(z, zeros, zeros)                    # log p(z_k), N(0, I)
        log_qz = log_normal_diag(z, mu, log_var)                     # log q(z_k | x)
        partial.append(torch.logsumexp(log_px + log_pz - log_qz, dim=0))  # (B,)
    return torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)


# -------------- 5. Bits per dimension on the 8-bit scale (Gaussian likelihood) --------------
# A density's value depends on the scale of the data (the same model on x/2 has log-density
# larger by D log 2); a scale-free number needs the discrete data the density stands for. Here:
# uniform dequantization (Theis et al. 2016, "A note on the evaluation of generative models",
# sec. 3.1). Level k in {0..255} becomes x = (k + u)/256, u ~ U[0, 1), so each level owns the
# bin [k/256, (k+1)/256), and for any density p on [0, 1]^D, by Jensen's inequality,
#
#     log P(k) = log int_bin p(x) dx = log E_u[p((k + u)/256)] - D log 256  >=  E_u[log p(x)] - D log 256.
#
# So  -log2 P(k) / D  <=  (-log p(x) + D log 256) / (D log 2)  =  -log p(x) / (D log 2) + 8  bits per
# 8-bit pixel (D log 256: the log of the Jacobian from [0, 1] to [0, 256)). Any upper bound on
# -log p(x) (negative ELBO, IWAE NLL) stays one. ddpm.py bounds the same quantity (a discretized
# decoder on the 256 levels of [-1, 1]), so the two are directly comparable.

def bits_per_dim_dequantized(nll_nats):
    """Upper bound on the 8-bit discrete NLL in bits/dim, from -log p(x) in nats of the density of
    dequantized x = (k + u)/256 in [0, 1]^784 (see above)."""
    return (nll_nats + D * math.log(256)) / (D * math.log(2))


# ---------------- 6. Training, evaluation on the held-out test split, main() ----------------

def train(args):
    device = setup(args)
    # --resume takes from the checkpoint the model, the data order, the objective and the optimizer.
    ckpt = start_or_resume(args, "vae", MODEL_KEYS + ("seed", "batch_size", "lr", "beta"))
    torch.manual_seed(args.seed)
    (train_x, train_y), (test_x, test_y) = (load_mnist(args.data_dir, train=t, device=device) for t in (True, False))
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)  # only now: bad input leaves no folder behind
    net = build_model(vars(args)).to(device)
    # Adam (Kingma & Ba 2015) at 1e-3, as in the PyTorch example VAE.
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, fused=fused_adam_ok(device))
    step = first_step = restore(ckpt, device, model=net, optimizer=opt) if ckpt else 0
    model_fn = make_model_fn(net, device, args.amp, args.compile)  # x, eps[, y] -> out, mu, log_var
    log(run_description(args, net, len(train_x), steps_per_epoch, total_steps, device))
    ckpt_path, t_start = os.path.join(args.out_dir, "ckpt.pt"), time.perf_counter()
    meter = Meter(step, total_steps, steps_per_epoch, args.batch_size, args.log_every, device)

    def save():  # no EMA of the weights (ckpt "ema" is None): see finish()
        save_checkpoint(ckpt_path, "vae", args, step, step // steps_per_epoch, device,
                        model=net, ema=None, optimizer=opt)
    sample_speed = None
    try:  # no net.train(): a new module starts in training mode
        while step < total_steps:
            for images, labels in epoch_batches((train_x, train_y), step, steps_per_epoch, args.batch_size, args.seed):
                x = likelihood_data(images, args.likelihood, args.binarize)    # a fresh binarization first,
                eps = torch.randn(x.shape[0], args.latent_dim, device=device)  # then eps: z = mu + sigma * eps
                recon, kl = elbo_terms(model_fn, net, x, eps, labels if args.class_cond else None)
                loss = vae_loss(recon, kl, args.beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                for name, value in (("loss", recon + args.beta * kl), ("recon", recon), ("KL", kl)):
                    meter.add(name, value)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # a grid every --sample-every epochs and at the end, then the checkpoint
                epoch = step // steps_per_epoch
                if (step % steps_per_epoch == 0 and epoch % args.sample_every == 0) or step >= total_steps:
                    path = os.path.join(args.out_dir, f"samples_epoch_{epoch:03d}.png")
                    sample_speed = save_grid(net.eval(), path, args.num_samples, args.seed, device, args.amp)
                    net.train()
                save()  # each epoch, so an interruption loses at most one
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)
    finish(args, device, net, test_x, test_y, meter, first_step, step, steps_per_epoch, time.perf_counter() - t_start,
           sample_speed)


def eval_data(test_x, likelihood, binarized, seed, device):
    """The test digits as the likelihood's data, drawn once from a generator seeded seed + SEED_EVAL:
    the bounds and the pictures see the very same binary / dequantized images. Returns the data and
    that generator, which goes on to draw the bounds' samples."""
    gen = torch.Generator(device=device).manual_seed(seed + SEED_EVAL)
    return likelihood_data(test_x, likelihood, binarized, generator=gen), gen


@torch.no_grad()
def evaluate(model_fn, model, test_x, test_y, args, device):
    """Held-out metrics in nats per image (beta = 1: the bound, whatever beta trained): negative
    ELBO = reconstruction + KL over the whole test split, the IWAE NLL estimate -L_K on the first
    --iw-images digits with K = --iw-samples; Gaussian: also bits/dim. test_x, test_y: uint8 images
    (N, 28, 28), labels; a CVAE is given the true labels: its bounds are on -log p(x | y)."""
    test_data, gen = eval_data(test_x, args.likelihood, args.binarize, args.seed, device)
    batch, gaussian = max(args.batch_size, 256), args.likelihood == "gaussian"

    def labels(i, j):  # the labels of test digits i..j for a CVAE, else None
        return test_y[i:j] if model.num_classes else None
    terms = []
    for i in range(0, len(test_data), batch):
        x = test_data[i:i + batch]
        eps = torch.randn((x.shape[0], model.latent_dim), device=device, generator=gen)
        terms.append(elbo_terms(model_fn, model, x, eps, labels(i, i + batch)))
    recon, kl = (torch.cat(t) for t in zip(*terms))  # (N,) each
    neg_elbo = recon + kl
    # The mean is the number that bounds the NLL of the test set. The median is also kept: a
    # learned per-pixel sigma can be overconfident on a few test digits (ink where the training
    # digits never had any), whose huge per-image cost then dominates the mean.
    m = {"test_neg_elbo": neg_elbo.mean().item(), "test_recon": recon.mean().item(), "test_kl": kl.mean().item(),
         "test_neg_elbo_median": neg_elbo.median().item(), "test_images": len(test_data),
         "bound_of": "-log p(x | y), true labels" if model.num_classes else "-log p(x)",
         "data": "uniformly dequantized MNIST x = (k + u)/256 in [0, 1] (test: fixed u)" if gaussian else
                 "dynamically binarized MNIST (test binarized once, fixed seed)" if args.binarize else
                 "grey-level MNIST with a Bernoulli decoder: nats are a cross-entropy, not a NLL"}
    if gaussian:
        m["test_bpd"] = bits_per_dim_dequantized(m["test_neg_elbo"])
    n, K = min(args.iw_images, len(test_data)), args.iw_samples
    if K > 0 and n > 0:
        log(f"IWAE: {n} test images x K = {K} samples = {n * K:,} decoder calls (--iw-images, --iw-samples)")
        t0 = time.perf_counter()

        def bound(i, j):  # L_K of test digits i..j; a CVAE's K samples are stacked: row r has label y[r % B]
            y = labels(i, j)
            decode = model.decode if y is None else lambda z: model.decode(z, y.repeat(len(z) // len(y)))
            return iwae_bound(lambda x: model.encode(x, y), lambda x, z: model.log_likelihood(x, decode(z)),
                              test_data[i:j], K, generator=gen)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):  # the networks as model_fn runs them
            bounds = torch.cat([bound(i, min(i + 16, n)) for i in range(0, n, 16)])  # 16 images per call
        m.update({"test_iwae_nll": -bounds.mean().item(), "test_iwae_k": K, "test_iwae_images": n,
                  "test_neg_elbo_iwae_images": neg_elbo[:n].mean().item()})
        if gaussian:
            m["test_bpd_iwae"] = bits_per_dim_dequantized(m["test_iwae_nll"])
        log(f"IWAE: {m['test_iwae_nll']:.2f} nats (negative ELBO on the same {n} images "
            f"{m['test_neg_elbo_iwae_images']:.2f}) in {time.perf_counter() - t0:.1f}s")
    return m


def main(argv=None):
    args = parse_args(argv)
    eval_only(args) if args.eval_only else train(args)


# ===================== Extensions: the pictures beyond the sample grid ======================

@torch.no_grad()
def save_pictures(net, test_x, test_y, args, device, prefix=""):
    """Everything drawn at the end of a run (or by --eval-only), the networks in the precision of
    training (bf16 with --amp), on the test digits that evaluate() scores. A CVAE draws its style
    grid in place of the interpolation and the manifold, which would need one label per picture."""
    test_data, _ = eval_data(test_x, args.likelihood, args.binarize, args.seed, device)
    names = ["reconstructions.png", "style.png" if net.num_classes else "interpolation.png"]
    names += ["manifold.png", "latent_space.png"] if args.latent_dim == 2 and not net.num_classes else []
    paths = [os.path.join(args.out_dir, prefix + name) for name in names]
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
        save_reconstructions(net, test_data, test_y, paths[0])
        if net.num_classes:
            save_style(net, test_data, test_y, paths[1], args.seed)
        else:
            save_interpolation(net, test_data, paths[1])
        if len(paths) > 2:
            save_latent_2d(net, test_data, test_y, *paths[2:])
    log("wrote " + ", ".join(paths))


@torch.no_grad()
def save_reconstructions(net, test_data, test_y, path, n=16):
    """Two rows per block: test inputs (as the model sees them: binarized for Bernoulli) over
    the decoder means at the posterior means z = mu(x) (a CVAE: mu(x, y), decoded with y)."""
    x, y = test_data[:2 * n], test_y[:2 * n] if net.num_classes else None
    recon = net.mean(net.decode(net.encode(x, y)[0], y))
    save_image(torch.cat([x[:n], recon[:n], x[n:], recon[n:]]).cpu(), path, nrow=n)


@torch.no_grad()
def save_interpolation(net, test_data, path, pairs=8, steps=10):
    """Each row walks in a straight line between the posterior means of two test digits,
    z = (1 - a) mu(x1) + a mu(x2), a = 0 .. 1, and shows the decoder means."""
    mu, _ = net.encode(test_data[:2 * pairs])
    a = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    z = (1 - a) * mu[:pairs, None] + a * mu[pairs:, None]           # (pairs, steps, L)
    save_image(net.mean(net.decode(z.reshape(pairs * steps, -1))).cpu(), path, nrow=steps)


def save_style(net, test_data, test_y, path, seed, rows=4):
    """A CVAE: what z holds once the label is given. Each row decodes one z with each label 0..9
    (columns 2 to 11). The top rows: z ~ N(0, I) (first column blank); the bottom rows: the
    posterior mean z = mu(x, y) of a test digit x (first column), its style redrawn as every digit."""
    device, x = test_data.device, test_data[:rows]
    gen = torch.Generator(device=device).manual_seed(seed + SEED_GRID)
    z = torch.cat([torch.randn((rows, net.latent_dim), device=device, generator=gen),
                   net.encode(x, test_y[:rows])[0]])                           # (2 rows, L)
    labels = torch.arange(10, device=device).repeat(len(z))                    # 0..9 for each z
    decoded = net.mean(net.decode(z.repeat_interleave(10, dim=0), labels)).view(len(z), 10, 1, 28, 28)
    first = torch.cat([torch.zeros_like(x), x]).view(len(z), 1, 1, 28, 28)
    save_image(torch.cat([first, decoded], 1).reshape(-1, 1, 28, 28).cpu(), path, nrow=11)


def save_latent_2d(net, test_data, labels, manifold_path, space_path, n=20, size=280):
    """A 2-D latent space both ways through the Gaussian CDF Phi, under which N(0, I) is uniform on the
    unit square. manifold.png, the learned manifold (Kingma & Welling fig. 4): an n x n grid evenly spaced
    on the unit square, mapped through Phi^-1 (each cell covers the same prior mass), decoded to their means.
    latent_space.png, where the test digits land, drawn without a plotting library: each posterior mean
    mu(x) a 3x3 dot in its class colour on a white canvas, the axes Phi(z) as in manifold.png; a strip of
    ten swatches below shows the colours of 0, 1, ..., 9 (the "tab10" palette)."""
    q = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    v = (math.sqrt(2) * torch.erfinv(2 * q - 1)).float()            # Phi^-1(q)
    zy, zx = torch.meshgrid(-v, v, indexing="ij")                   # z_2 grows upwards in the picture
    z = torch.stack([zx.reshape(-1), zy.reshape(-1)], dim=1).to(test_data.device)
    save_image(net.mean(net.decode(z)).cpu(), manifold_path, nrow=n, padding=0)
    palette = torch.tensor([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                            [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]) / 255
    u = 0.5 * (1 + torch.erf(net.encode(test_data)[0].cpu() / math.sqrt(2)))  # Phi(z) in (0, 1)
    col = (u[:, 0] * (size - 3)).long().clamp(0, size - 3)
    row = ((1 - u[:, 1]) * (size - 3)).long().clamp(0, size - 3)
    canvas = torch.ones(3, size + size // 10, size)
    for d in range(9):  # the 3x3 dot
        canvas[:, row + d // 3, col + d % 3] = palette[labels.cpu()].T
    for c in range(10):
        canvas[:, size + 2:, c * size // 10 + 2:(c + 1) * size // 10 - 2] = palette[c].view(3, 1, 1)
    save_image(canvas, space_path)


# =============================== Run plumbing of this script ================================

def check_args(args):
    """Each likelihood has its own knob (one given to the other would be silently ignored); and
    --score-samples needs score.py and its classifier, checked before a long run, not after it."""
    if args.likelihood == "bernoulli" and args.sigma is not None:
        fail("--sigma applies to --likelihood gaussian")
    if args.likelihood == "gaussian" and args.binarize is not None:
        fail("--binarize / --no-binarize apply to --likelihood bernoulli (gaussian data are dequantized)")
    if args.likelihood == "gaussian":
        args.binarize, args.sigma = False, "learned" if args.sigma is None else args.sigma
    args.binarize = True if args.binarize is None else args.binarize
    if args.sigma not in (None, "learned"):  # kept as the text given: one type, str, in args and checkpoints
        try:
            positive_float(args.sigma)
        except argparse.ArgumentTypeError:
            fail(f"--sigma: expected 'learned' or a positive number, got {args.sigma!r}")
    if args.score_samples:
        try:
            import score
        except ImportError:
            fail("--score-samples needs score.py, this project's sample scorer, beside this script")
        score.check_classifier(args.classifier, args.data_dir)


def run_description(args, net, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the model, the likelihood, the data and the run length."""
    data = f" (sigma {args.sigma})" if args.likelihood == "gaussian" else (
        " (binarized)" if args.binarize else " on grey levels: a cross-entropy, not a likelihood")
    return (f"vae: {sum(p.numel() for p in net.parameters()) / 1e6:.3f}M parameters ({args.arch}, latent "
            f"{args.latent_dim}{', conditional on the label' if args.class_cond else ''}), {args.likelihood}{data}, "
            f"beta {args.beta} | {n_train} train images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps | device {device.type}, compile={args.compile}, amp={args.amp}"
            + (f" | at the end: {args.score_samples} prior samples scored" if args.score_samples else ""))


def finish(args, device, net, test_x, test_y, meter, first_step, step, steps_per_epoch, wall, sample_speed):
    """The end of a run: held-out metrics, pictures, metrics.json, a summary line. No EMA of the
    weights: a VAE's samples do not need it, and the bound is for the weights that were trained."""
    images_per_sec = meter.images_per_sec((step - first_step) * args.batch_size, wall)
    train_loss = meter.last.get("loss", float("nan"))
    m = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch, "train_loss": train_loss,
         "train_images_per_sec": images_per_sec, "sample_images_per_sec": sample_speed, "wall_time_s": wall,
         "device": describe(device), "parameters": sum(p.numel() for p in net.parameters())}
    held, summary = held_out(net.eval(), test_x, test_y, args, device)
    m.update({**held, "peak_memory_mb": peak_memory_mb(device)})
    write_json(m, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {train_loss:.2f} | {summary} "
        f"| {images_per_sec:,.0f} train img/s "
        f"| peak memory {m['peak_memory_mb']:.0f} MB")


def held_out(net, test_x, test_y, args, device, prefix=""):
    """evaluate(), the pictures, and with --score-samples the score: the end of a run and --eval-only.
    The plain module, not a compiled one: the batch shapes vary (a compiled graph would recompile).
    Returns the metrics and one line of them."""
    m = evaluate(make_model_fn(net, device, args.amp), net, test_x, test_y, args, device)
    save_pictures(net, test_x, test_y, args, device, prefix)
    if args.score_samples:
        m["score"] = score_run(net, args, device)
    parts = [("test -ELBO {test_neg_elbo:.2f} nats (recon {test_recon:.2f} + KL {test_kl:.2f}, median "
              "{test_neg_elbo_median:.2f})", "test_neg_elbo"),
             (" | IWAE NLL {test_iwae_nll:.2f} nats (K={test_iwae_k}, {test_iwae_images} images)", "test_iwae_nll"),
             (" | {test_bpd:.3f} bits/dim (ELBO)", "test_bpd"), (", {test_bpd_iwae:.3f} (IWAE)", "test_bpd_iwae")]
    fd = f" | FD {m['score']['fd']:.2f} ({m['score']['n']} samples)" if "fd" in m.get("score", {}) else ""
    return m, "".join(text.format(**m) for text, key in parts if key in m) + fd


def eval_only(args):
    """Evaluate out-dir/ckpt.pt: held-out negative ELBO, IWAE NLL, bits/dim, and the pictures."""
    device = setup(args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "vae")
    vars(args).update({key: ckpt["config"][key] for key in MODEL_KEYS + ("seed",)})
    net = build_model(ckpt["config"]).to(device).eval()
    net.load_state_dict(ckpt["model"])
    test_x, test_y = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {ckpt_path} (step {ckpt['step']})")
    speed = save_grid(net, os.path.join(args.out_dir, "eval_samples.png"), args.num_samples, args.seed, device, args.amp)
    held, summary = held_out(net, test_x, test_y, args, device, prefix="eval_")
    log(summary)
    write_json({"checkpoint": ckpt_path, "step": ckpt["step"], "device": describe(device), "sample_images_per_sec": speed,
                **held},
               os.path.join(args.out_dir, "eval.json"))


def save_grid(net, path, n, seed, device, amp):
    """Decoder means of n prior samples z ~ N(0, I), the same z every call (a generator seeded
    seed + SEED_GRID), so the grids of successive epochs show the same latent points. A CVAE:
    one row per digit 0..9, n // 10 samples each. Returns the sampling speed in images/s."""
    gen = torch.Generator(device=device).manual_seed(seed + SEED_GRID)
    nrow = max(1, n // 10) if net.num_classes else int(math.ceil(math.sqrt(n)))
    y = torch.arange(10, device=device).repeat_interleave(nrow) if net.num_classes else None
    t0 = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        images = net.sample(n if y is None else len(y), gen, y).cpu()
    speed = len(images) / (time.perf_counter() - t0)  # .cpu() waited for the device: the time is real
    save_image(images, path, nrow=nrow)
    log(f"wrote {path} ({len(images) / speed:.2f}s)")
    return speed


def score_run(net, args, device):
    """--score-samples N: the decoder means of N prior draws z ~ N(0, I), as in the grids, scored
    by score.py. A CVAE: the ten digits equally often, and the classifier's accuracy on them."""
    import score  # here only: vae.py runs without score.py unless --score-samples asks for it

    def draw(n, gen, y=None):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            return net.sample(n, gen, None if y is None else y.to(device))
    labels = torch.arange(args.score_samples) % 10 if net.num_classes else None
    return score.draw_and_score(draw, args.score_samples, device, "decoder means of z ~ N(0, I), one decoder pass each",
                                args.classifier, args.data_dir, args.seed, labels=labels)


# ==================================== appendix: plumbing ====================================
# Nothing below is about the model. The same block closes every script that runs alone, byte
# for byte (tests/test_appendix.py): read it once; a copied file runs. Command line, device,
# MNIST and its batches, checkpoints and random state, the model wrapper, the log.

PROG = os.path.basename(__file__)  # the name in error lines (a script that borrows this plumbing sets its own)
CKPT_VERSION = 2  # 2: one name, class_cond, for conditioning in every script
SEED_GRID, SEED_EVAL, SEED_SCORE = 1, 2, 3  # fixed generators seeded args.seed + these: grids, evaluation, scoring
KERNEL_OPTIONS = ("foreach", "fused", "capturable")  # how an optimizer runs on its device, not what it computes


def parse_args(argv=None):
    """The knobs at the top of the file, read from the command line; bad input is one line."""
    parser = make_parser()
    parser.prog, parser.error = PROG, fail  # argparse's own errors as one line too
    args = parser.parse_args(argv)
    check_args(args)
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, except None: the help of such a flag says what a run does
    without it ("stop after this many steps", "default: on CUDA only")."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


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


def make_out_dir(path):
    """Create --out-dir once all input is checked (bad input leaves no folder) and prove it writable."""
    try:
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, ".write_test"), "w").close()
        os.remove(os.path.join(path, ".write_test"))
    except OSError as e:
        fail(f"cannot write to --out-dir {path}: {e.strerror or e}")


def setup(args):
    """The device (auto: CUDA, else MPS, else the CPU), and what depends on it: bf16 autocast by
    default on CUDA only, TF32 on. (torch.compile is off unless asked for, on every device.)"""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d, ok in available.items() if ok) if args.device == "auto" else args.device
    if not available[name]:
        fail(f"--device {name} asked, but it is not available")
    device = torch.device(name)
    args.amp = (device.type == "cuda") if args.amp is None else args.amp
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


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
    """torchvision's save_image (a grid PNG), imported on first use: half of a script's start-up."""
    from torchvision.utils import save_image as write_png
    write_png(images, path, **grid_options)


def load_mnist(data_dir, train, device):
    """MNIST as whole uint8 tensors on the device: images (N, 28, 28), labels (N,)."""
    import torchvision  # here, not at the top: see save_image
    existed = os.path.exists(data_dir)
    try:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:  # offline, or a broken folder: one clear line, not a traceback
        if not existed:  # and no empty folder left behind by the failed download
            import shutil
            shutil.rmtree(data_dir, ignore_errors=True)
        fail(f"could not load MNIST ({type(e).__name__}). Offline? Put train-images-idx3-ubyte, "
             f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in "
             f"{os.path.join(data_dir, 'MNIST', 'raw')}/ or point --data-dir at a folder that has them")
    return ds.data.to(device), ds.targets.to(device)


def run_length(args, n_train):
    """(steps per epoch, total steps). Full batches only: every step has the same shape, and
    step -> (epoch, batch) is exact."""
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({n_train} images)")
    return steps_per_epoch, min(args.epochs * steps_per_epoch, args.max_steps or math.inf)


def epoch_batches(tensors, step, steps_per_epoch, batch_size, seed):
    """The rest of the epoch that `step` is in: for each batch, the same rows of every tensor
    (images, labels), in an order seeded by (seed, epoch): a resumed run sees exactly the
    batches of an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 100_003 + step // steps_per_epoch)
    perm = torch.randperm(len(tensors[0]), generator=g).to(tensors[0].device)
    for i in range(step % steps_per_epoch, steps_per_epoch):  # index_select: ~7x faster than [] on CPU
        rows = perm[i * batch_size:(i + 1) * batch_size]
        yield tuple(x.index_select(0, rows) for x in tensors)


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
    """Load each object (model=, ema=, optimizer=) from its key and the RNG; return the step. An
    optimizer keeps this run's kernel options: the checkpoint may come from another device."""
    for key, obj in objects.items():
        state = ckpt[key]
        if isinstance(obj, torch.optim.Optimizer):
            state = {**state, "param_groups": [{**saved, **{k: v for k, v in mine.items() if k in KERNEL_OPTIONS}}
                                               for saved, mine in zip(state["param_groups"], obj.param_groups)]}
        obj.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type in ("cuda", "mps") and device.type in ckpt["rng"]:
        getattr(torch, device.type).set_rng_state(ckpt["rng"][device.type])
    log(f"resumed at step {ckpt['step']} (epoch {ckpt['epoch']})")
    return ckpt["step"]


def save_checkpoint(path, kind, args, step, epoch, device, **objects):
    """Plain data (loads with weights_only=True), written atomically: a crash mid-save keeps the old one.
    objects: modules and optimizers (stored as their state_dict), or plain numbers."""
    rng = {"cpu": torch.get_rng_state(), **({device.type: getattr(torch, device.type).get_rng_state()}
                                            if device.type in ("cuda", "mps") else {})}
    state = {"kind": kind, "version": CKPT_VERSION, "config": vars(args), "step": step, "epoch": epoch, "rng": rng,
             **{k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in objects.items()}}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, kind):
    """A checkpoint of this kind and format, loaded as data (weights_only=True: no code in it runs)."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        fail(f"{path} is not a {kind} checkpoint (kind: {ckpt.get('kind') if isinstance(ckpt, dict) else None!r})")
    if ckpt.get("version", 0) != CKPT_VERSION:
        fail(f"{path} has checkpoint format {ckpt.get('version', 0)}; this script reads format {CKPT_VERSION}: "
             f"retrain, or use the version of this project that wrote it")
    return ckpt


class Meter:
    """The log line. Per-image losses are summed on the device and read once per line (a sync
    every step would stall a GPU): each figure is a mean since the last line, per group if
    asked. images/s leaves out the first interval (compile, warm-up) and time in paused().
    note: images/s -> an extra text for the line (MFU on a GPU, time left), or None."""

    def __init__(self, step, total_steps, steps_per_epoch, batch_size, log_every, device, note=None):
        self.total, self.per_epoch, self.batch, self.every = total_steps, steps_per_epoch, batch_size, log_every
        self.device, self.sums, self.last, self.first, self.note = device, {}, {}, True, note
        self.t_log, self.step_log, self.steady_time, self.steady_images = time.perf_counter(), step, 0.0, 0
        self.t_start, self.paused_time, self.pause_start = self.t_log, 0.0, None

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
        log(f"step {step}/{self.total} | epoch {step / self.per_epoch:.2f} | {figures} | {speed:,.0f} img/s "
            + (f"| {self.note(speed)} " if self.note else "") + f"| eta {(self.total - step) * self.batch / speed / 60:.1f} min")
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


def fail(message):
    """Stop with one clear line on stderr: bad input is not a traceback."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def log(message):
    print(message, flush=True)

# ================================== end of the appendix ==================================


if __name__ == "__main__":
    main()
