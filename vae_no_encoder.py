"""
vae_no_encoder.py: a "VAE" whose encoder is not learned, the bridge from vae.py to ddpm.py.

vae.py learns an encoder q(z|x) and a decoder p(x|z). Here the encoder is replaced by a fixed,
weight-free corruption of the digit with Gaussian noise, at one chosen noise level a = alpha-bar:

    q(z | x) = N(sqrt(a) x, (1 - a) I),   i.e.  z = sqrt(a) x + sqrt(1 - a) eps,  eps ~ N(0, I)
    p(x | z) = N(mu_theta(z), sigma^2 I)  (a Gaussian decoder: a network that denoises z)
    p(z)     = N(0, I)  (--prior standard)  or  a per-pixel Gaussian fitted to the corrupted
               training digits (--prior fitted)

z has the shape of the image (28 x 28): the "latent" is a noisy digit. This is exactly one
step of ddpm.py's forward process, q(x_t | x_0) at a single t. The ELBO of this model
reduces, up to a constant and a weight, to predicting the noise (section 3):

    -ELBO(x) = (1 - a) / (2 a sigma^2) * E || eps - eps_theta(z) ||^2  +  const(x)

so the decoder is trained with DDPM's simple loss at one fixed noise level. To generate, the
model must decode a z drawn from the prior, and that is where one step fails (section 6):
little noise (a near 1) denoises well but the prior is nothing like the noisy digits it must
stand for; much noise (a near 0) makes the prior right but the decoder can only return a blur,
the average of all the digits that z could have come from.

One trained model per noise level. Train one run per --alpha-bar, then compare them with
--sweep, which loads the runs' checkpoints and draws all of them in one picture and one table:

    python vae_no_encoder.py --data-dir ../shared/mnist --alpha-bar 0.9 --out-dir out/vne_cnn_0.9
    python vae_no_encoder.py --data-dir ../shared/mnist --alpha-bar 0.3 --arch unet --out-dir out/vne_unet_0.3
    (add --score-samples 1000 to score 1000 samples per prior at the end with score.py's classifier)
    python vae_no_encoder.py --data-dir ../shared/mnist --sweep out/vne_cnn_0.9 out/vne_unet_0.3 --out-dir out/vne_sweep

A training run writes to --out-dir (default out/vae_no_encoder): ckpt.pt (weights, fitted prior,
decoder sigma, optimizer, step, RNG), samples_epoch_NNN.png (decoded draws from --prior),
denoise.png (rows: test digits / their corrupted z / the decoder's reconstruction),
samples_standard.png and samples_fitted.png (decoded draws from each prior), metrics.json
(config, losses, held-out noise MSE, x MSE and the negative ELBO in bits/dim for both priors,
speed). --sweep writes sweep.png and sweep.json to --out-dir.

Reading order: the knobs (make_parser) -> networks -> corruption and what the network predicts
-> the ELBO and its reduction to noise prediction -> priors -> held-out bound -> generation ->
training loop -> evaluation, sweep, main() -> closing notes (what this tells us, how DDPM fixes
it) -> appendix (plumbing: command line, device, data, checkpoints, the log).
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

from unet import UNet

D = 28 * 28  # pixels per image: the "dim" of bits/dim


def make_parser():
    p = argparse.ArgumentParser(description="Train a decoder-only VAE (fixed one-step Gaussian corruption) "
                                "on MNIST, or compare trained runs with --sweep.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/vae_no_encoder", help="checkpoint, pictures, metrics.json (or sweep.*)")
    g.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    g.add_argument("--seed", type=int, default=0, help="weights, data order, noise, pictures")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (default: on for CUDA only)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the network (default: on for CUDA only)")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    g.add_argument("--sample-every", type=positive_int, default=5, help="epochs between sample grids")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end: draw N samples under each prior and score them with score.py (FD, IS, "
                        "precision/recall; N >= 1000 for FDs that compare); 0: off")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt",
                   help="score.py's digit classifier, for --score-samples")
    g.add_argument("--sweep", nargs="+", metavar="DIR", default=None,
                   help="instead of training: compare the runs in these folders (one per noise level / arch); "
                        "writes sweep.png and sweep.json to --out-dir")

    g = p.add_argument_group("model")
    g.add_argument("--alpha-bar", type=open_unit_interval, default=0.9,
                   help="noise level a of q(z|x) = N(sqrt(a) x, (1 - a) I), in (0, 1): 1 is no noise, 0 all noise")
    g.add_argument("--arch", choices=["cnn", "unet"], default="cnn",
                   help="decoder: plain CNN without skip connections, or unet.py's U-Net without time conditioning")
    g.add_argument("--channels", type=positive_int, default=16, help="width of the first level of either network")
    g.add_argument("--pred", choices=["eps", "x0"], default="eps",
                   help="what the network predicts: the noise or the digit")
    g.add_argument("--prior", choices=["standard", "fitted"], default="fitted",
                   help="prior for the samples_epoch_NNN.png grids (the final pictures and metrics use both)")
    return p


# ---------------------------------------------------------------------------------------
# 1. Networks: z (B, 1, 28, 28) -> (B, 1, 28, 28), eps_hat or x0_hat
# ---------------------------------------------------------------------------------------
# The decoder is an image-to-image network. Two of them, because the comparison is part of
# the lesson:
#   cnn   a plain encoder-decoder CNN, 28 -> 14 -> 7 -> 14 -> 28, with NO skip connections:
#         everything it knows about z must squeeze through the 7 x 7 bottleneck.
#   unet  unet.py's U-Net without time conditioning (there is one noise level, so nothing to
#         condition on): the same down/up path plus skip connections that carry the full
#         28 x 28 detail of z straight to the output layers.
# With little noise the answer is "z, slightly cleaned", which the U-Net can copy through its
# skips; the CNN has to re-draw the digit from 7 x 7 features. With much noise one might
# expect the two to come closer (the fine detail of z is mostly noise), but with the default
# eps-prediction the output IS that fine detail, and on MNIST the U-Net wins at every level
# we tried (README table; compare --pred x0 for the CNN, section 2).

def conv_block(cin, cout, stride=1):
    """3x3 conv -> GroupNorm -> SiLU (stride 2 halves H and W: 28 -> 14 -> 7)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


def up_block(cin, cout):
    """4x4 transposed conv with stride 2 (7 -> 14 -> 28) -> GroupNorm -> SiLU."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1),
                         nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


class PlainCNN(nn.Module):
    """A convolutional autoencoder used as a denoiser: no skip or residual connections."""

    def __init__(self, channels=32):
        super().__init__()
        c = channels
        self.layers = nn.Sequential(
            conv_block(1, c), conv_block(c, 2 * c, stride=2),              # (B, 2c, 14, 14)
            conv_block(2 * c, 2 * c), conv_block(2 * c, 4 * c, stride=2),  # (B, 4c, 7, 7): the bottleneck
            conv_block(4 * c, 4 * c),
            up_block(4 * c, 2 * c), conv_block(2 * c, 2 * c),              # (B, 2c, 14, 14)
            up_block(2 * c, c), conv_block(c, c),                          # (B, c, 28, 28)
            nn.Conv2d(c, 1, 3, padding=1))                                 # (B, 1, 28, 28)

    def forward(self, z):
        return self.layers(z)


def make_network(arch, channels):
    if arch == "cnn":
        return PlainCNN(channels)
    if arch == "unet":
        # Small on purpose (trains in minutes on a CPU): two levels 28 -> 14 -> 7 at widths
        # c, 2c, 2c, one residual block per level, no attention.
        return UNet(in_channels=1, out_channels=1, channels=channels, channel_mult=(1, 2, 2), num_blocks=1,
                    attention=False, time_conditioning=False)
    raise ValueError(f"unknown arch {arch!r}: use 'cnn' or 'unet'")


class NoEncoderVAE(nn.Module):
    """The decoder network plus the model's three fitted constants, kept as buffers so that
    they travel in the checkpoint's state_dict:
      prior_mean, prior_std  (1, 1, 28, 28)  the fitted prior (section 4); N(0, I) is fixed
      log_sigma              ()              the decoder's standard deviation (section 3)
    The noise level a and the prediction target are plain config values, not tensors.
    No EMA of the weights here (the checkpoint's "ema" is None): one noise level and a few
    minutes of training; ddpm.py is where the averaged weights earn their keep."""

    def __init__(self, arch="cnn", channels=32, alpha_bar=0.9, parameterization="eps"):
        super().__init__()
        self.net = make_network(arch, channels)
        self.alpha_bar = float(alpha_bar)
        self.parameterization = parameterization
        self.register_buffer("prior_mean", torch.zeros(1, 1, 28, 28))
        self.register_buffer("prior_std", torch.ones(1, 1, 28, 28))
        self.register_buffer("log_sigma", torch.zeros(()))

    def forward(self, z):
        return self.net(z)


MODEL_KEYS = ("arch", "channels", "alpha_bar", "pred")
RESUMED_KEYS = MODEL_KEYS + ("seed", "batch_size", "lr")  # --resume takes these from the checkpoint


def build_model(config):
    """The model described by a config dict (the argparse namespace, or a checkpoint's).
    Its buffers (fitted prior, decoder sigma) come from the checkpoint's state_dict."""
    return NoEncoderVAE(arch=config["arch"], channels=config["channels"], alpha_bar=config["alpha_bar"],
                        parameterization=config["pred"])


# ---------------------------------------------------------------------------------------
# 2. The fixed "encoder" and what the network predicts
# ---------------------------------------------------------------------------------------

def to_model_range(images_u8):
    """uint8 (B, 28, 28) in 0..255 -> float (B, 1, 28, 28) in [-1, 1]: x = k / 127.5 - 1."""
    return images_u8.unsqueeze(1).float() / 127.5 - 1


def corrupt(x, a, eps):
    """z ~ q(z | x) = N(sqrt(a) x, (1 - a) I) by reparameterisation (Ho et al. 2020, eq. 4 at one t):
        z = sqrt(a) x + sqrt(1 - a) eps.
    Shrinking x by sqrt(a) while adding noise of variance 1 - a keeps Var[z] near 1 for data
    of variance near 1: the noise replaces signal rather than piling on top of it."""
    return math.sqrt(a) * x + math.sqrt(1 - a) * eps


def predict_x0_eps(a, z, out, parameterization):
    """Turn the network output into (x0_hat, eps_hat), the two being tied by z:

    eps: the network predicts the noise; x0_hat = (z - sqrt(1 - a) eps_hat) / sqrt(a)
    x0:  the network predicts the digit; eps_hat = (z - sqrt(a) x0_hat) / sqrt(1 - a)

    The decoder mean mu_theta(z) of p(x | z) is x0_hat in both cases.

    The difference, at one fixed noise level: with the loss weighted as in section 3 both
    optimise the same number (a constant factor apart), so only the network's job changes.
    eps: the output is the noise itself, 784 independent numbers; x0_hat is then z minus that
    noise, a global skip connection for free. A U-Net can copy the noise out of z through its
    skips (noise = z minus a smooth digit). A network with a bottleneck cannot pass 784
    independent numbers through 7 x 7 features, so the plain CNN learns eps slowly.
    x0: the output is a clean digit, smooth and compressible, which suits a bottleneck. But
    its errors are not divided down: an eps-error becomes an x-error sqrt((1 - a)/a) times its
    size, small when a is near 1, large when a is near 0, where predicting x0 directly is the
    better-conditioned choice (and eps-prediction magnifies every slip)."""
    if parameterization == "eps":
        eps = out
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    elif parameterization == "x0":
        x0 = out
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
    else:
        raise ValueError(f"unknown prediction target {parameterization!r}: use 'eps' or 'x0'")
    return x0, eps


# ---------------------------------------------------------------------------------------
# 3. The ELBO, and why it is "predict the noise"
# ---------------------------------------------------------------------------------------
# The ELBO of vae.py, with q fixed (Kingma & Welling eq. 3):
#
#   ELBO(x) = E_{q(z|x)} [ log p(x | z) ]  -  KL( q(z | x) || p(z) )
#
# The KL has no weights in it: q is fixed and the prior is fixed (or fitted once from data,
# section 4), so training the decoder only touches the first term. With the Gaussian decoder
# N(mu_theta(z), sigma^2 I) over the D pixels,
#
#   log p(x | z) = -D/2 log(2 pi sigma^2) - || x - mu_theta(z) ||^2 / (2 sigma^2).
#
# Write the mean through a noise predictor, mu_theta(z) = (z - sqrt(1 - a) eps_theta(z)) / sqrt(a)
# (section 2), and put in z = sqrt(a) x + sqrt(1 - a) eps: x = (z - sqrt(1 - a) eps) / sqrt(a), so
#
#   x - mu_theta(z) = sqrt((1 - a) / a) (eps_theta(z) - eps)
#
# and therefore
#
#   -ELBO(x) = (1 - a) / (2 a sigma^2)  E_eps || eps - eps_theta(z) ||^2   +  D/2 log(2 pi sigma^2)
#              `---- weight = 1 / (2 sigma^2 snr), snr = a / (1 - a) ----'     + KL(q(z|x) || p(z))
#
# The last two terms do not depend on the network, so for a fixed sigma maximising the ELBO is
# minimising the noise-prediction MSE: Ho et al.'s simple loss (eq. 14) at a single t, where
# the weight is one constant and can be dropped. For a given network the best sigma is the
# root of the mean squared x-error, fitted in closed form after training (fit_decoder_sigma).

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def prior_kl(x, a, prior_mean, prior_std):
    """KL(q(z | x) || p(z)) per image, summed over pixels: (B, 1, 28, 28) -> (B,).
    q(z|x) = N(sqrt(a) x, 1 - a) and p(z) = N(prior_mean, prior_std^2), both per pixel."""
    logvar_q = torch.full_like(x, math.log(1 - a))
    return normal_kl(math.sqrt(a) * x, logvar_q, prior_mean, 2 * torch.log(prior_std)).sum(dim=(1, 2, 3))


def reconstruction_nll_from_noise(eps, eps_hat, a, log_sigma):
    """-log p(x | z) per image for the continuous Gaussian decoder, written through the noise
    (the reduction above): (1 - a)/(2 a sigma^2) ||eps - eps_hat||^2 + D/2 log(2 pi sigma^2)."""
    sigma2 = torch.exp(2 * log_sigma)
    sq = ((eps - eps_hat) ** 2).sum(dim=(1, 2, 3))
    d = eps[0].numel()
    return (1 - a) / (2 * a * sigma2) * sq + 0.5 * d * torch.log(2 * math.pi * sigma2)


def negative_elbo(x, eps, eps_hat, a, log_sigma, prior_mean, prior_std):
    """-ELBO(x) in nats per image, one-sample estimate of the reconstruction term and the KL
    in closed form: the equation above, term by term."""
    return reconstruction_nll_from_noise(eps, eps_hat, a, log_sigma) + prior_kl(x, a, prior_mean, prior_std)


def noise_prediction_loss(model_fn, x, a, parameterization, generator=None):
    """The training loss, per image: mean over pixels of ||eps - eps_hat||^2.  (B,1,28,28) -> (B,)

    For --pred x0 the same number is computed from the x-error: ||eps - eps_hat||^2 =
    snr ||x - x0_hat||^2 with snr = a/(1 - a) (section 3), so both targets report and
    optimise the same quantity and their losses compare directly."""
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    z = corrupt(x, a, eps)
    out = model_fn(z)
    if parameterization == "eps":
        return ((out - eps) ** 2).mean(dim=(1, 2, 3))
    if parameterization == "x0":
        return a / (1 - a) * ((out - x) ** 2).mean(dim=(1, 2, 3))
    raise ValueError(f"unknown prediction target {parameterization!r}: use 'eps' or 'x0'")


@torch.no_grad()
def fit_decoder_sigma(model_fn, model, train_x, args, device):
    """log sigma of the decoder: the maximum-likelihood scalar for a Gaussian decoder,
    sigma^2 = mean squared error ||x - x0_hat||^2 / D over the training digits (one z each)."""
    a, batch = model.alpha_bar, max(args.batch_size, 256)
    generator = torch.Generator(device=device).manual_seed(args.seed + 2)
    total, count = 0.0, 0
    for i in range(0, len(train_x), batch):
        x = to_model_range(train_x[i:i + batch])
        z = corrupt(x, a, torch.randn(x.shape, device=x.device, generator=generator))
        x0_hat, _ = predict_x0_eps(a, z, model_fn(z), model.parameterization)
        total += ((x - x0_hat) ** 2).sum().item()
        count += x.numel()
    return 0.5 * math.log(total / count)


# ---------------------------------------------------------------------------------------
# 4. Priors
# ---------------------------------------------------------------------------------------
# To generate, the model draws z ~ p(z) and decodes it. The samples are only as good as the
# match between p(z) and the z's the decoder was trained on, the aggregate posterior
# q(z) = E_x q(z | x): the training digits, shrunk by sqrt(a), plus noise of variance 1 - a.
#
# standard  N(0, I), the prior of vae.py and ddpm.py. Per pixel q(z) has mean sqrt(a) E[x]
#           and variance a Var[x] + (1 - a). MNIST in [-1, 1] is mostly background at -1:
#           E[x] is near -1 in the corners and Var[x] near 0 there, so a corner pixel of z has
#           mean ~ -sqrt(a) and variance ~ 1 - a, while N(0, I) says mean 0, variance 1. Only
#           when a -> 0 does q(z) -> N(0, I); at a = 0.9 a prior draw looks nothing like a
#           corrupted digit (no dark background, no strokes), and the decoder, which has never
#           seen such an input, returns whatever its training never pinned down.
# fitted    the best per-pixel diagonal Gaussian for q(z) (maximum likelihood = moment
#           matching): mean sqrt(a) mu_j, variance a s_j^2 + (1 - a), with mu_j and s_j^2 the
#           mean and variance of pixel j over the training digits. It knows where ink usually
#           is, but not that the pixels of one digit go together (a diagonal Gaussian has no
#           correlations), so with little noise its draws are pixel-wise independent speckle,
#           not strokes: the decoder denoises them into something that is no digit.

def fit_prior(train_x):
    """(mean, std) of the fitted prior before corruption: per-pixel mean and standard
    deviation of the training digits in [-1, 1], each (1, 1, 28, 28). The prior of the
    corrupted z at level a follows in closed form (prior_at)."""
    x = train_x.double()
    return x.mean(dim=0, keepdim=True).float(), x.var(dim=0, unbiased=False, keepdim=True).sqrt().float()


def prior_at(data_mean, data_std, a):
    """The moments of q(z) at level a: mean sqrt(a) mu, variance a s^2 + (1 - a) (z is a scaled
    digit plus independent noise, so the variances add)."""
    return math.sqrt(a) * data_mean, (a * data_std ** 2 + (1 - a)).sqrt()


def prior_params(model, prior):
    """(mean, std) of the chosen prior as tensors on the model's device, (1, 1, 28, 28)."""
    if prior == "standard":
        return torch.zeros_like(model.prior_mean), torch.ones_like(model.prior_std)
    if prior == "fitted":
        return model.prior_mean, model.prior_std
    raise ValueError(f"unknown prior {prior!r}: use 'standard' or 'fitted'")


# ---------------------------------------------------------------------------------------
# 5. The held-out bound in bits/dim
# ---------------------------------------------------------------------------------------
# The data are 8-bit: x = k/127.5 - 1. A continuous density on them is not a likelihood, so
# the held-out number uses the decoder of ddpm.py's L_0: the probability of x's bin
# [x - 1/255, x + 1/255] under N(mu_theta(z), sigma^2) (edge bins open). With that decoder
# -ELBO is a real upper bound on -log P(x) of the discrete digits, in the same units as
# ddpm.py's bound. (When sigma is much wider than the bin, the bin's probability is about
# density x 2/255, so the reduction above still describes what training minimised.)

def log_normal_cdf_diff(lo, hi):
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails (Phi = standard normal CDF).
    In the right tail Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi) keeps both CDFs small."""
    flip = lo > 0
    a, b = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    log_a, log_b = log_ndtr(a), log_ndtr(b)
    return log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-12)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(pixel bin of x) under N(mean, e^(2 log_scale)) (Ho et al. 2020, sec. 3.3, eq. 13)."""
    inv_scale = torch.exp(-log_scale)
    lo = (x - mean - 1.0 / 255) * inv_scale
    hi = (x - mean + 1.0 / 255) * inv_scale
    log_cdf_hi = log_ndtr(hi)
    log_sf_lo = log_ndtr(-lo)
    mid = log_normal_cdf_diff(lo, hi)
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, mid))


# ---------------------------------------------------------------------------------------
# 6. Generation: decode a draw from the prior
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model_fn, model, n, prior, generator=None):
    """n samples in [-1, 1]: z ~ p(z), then the decoder mean x0_hat(z) (not mean + sigma noise:
    sigma is the size of the decoder's error, and adding it would only show speckle)."""
    mean, std = prior_params(model, prior)
    z = mean + std * torch.randn((n, 1, 28, 28), device=mean.device, generator=generator)
    x0_hat, _ = predict_x0_eps(model.alpha_bar, z, model_fn(z), model.parameterization)
    return x0_hat.clamp(-1, 1), z


@torch.no_grad()
def denoise(model_fn, model, x, generator=None):
    """(z, x0_hat) for clean digits x: corrupt once, decode once."""
    z = corrupt(x, model.alpha_bar, torch.randn(x.shape, device=x.device, generator=generator))
    x0_hat, _ = predict_x0_eps(model.alpha_bar, z, model_fn(z), model.parameterization)
    return z, x0_hat.clamp(-1, 1)


def to_image(x):
    """[-1, 1] -> [0, 1] for save_image (z can leave [-1, 1]: clipped for display)."""
    return ((x + 1) / 2).clamp(0, 1).cpu()


def save_samples(model_fn, model, args, device, epoch):
    """samples_epoch_NNN.png: 64 decoded draws from --prior, from the same z every epoch (seed + 1)."""
    path = os.path.join(args.out_dir, f"samples_epoch_{epoch:03d}.png")
    model.eval()
    samples, _ = generate(model_fn, model, 64, args.prior, torch.Generator(device=device).manual_seed(args.seed + 1))
    save_image(to_image(samples), path, nrow=8)
    model.train()
    log(f"wrote {path} ({args.prior} prior)")


def save_pictures(model_fn, model, test_x, args, device):
    """denoise.png (test digits / z / reconstruction, 16 columns) and one grid per prior."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 4)
    x = to_model_range(test_x[:16])
    z, x_hat = denoise(model_fn, model, x, gen)
    paths = [os.path.join(args.out_dir, "denoise.png")]
    save_image(to_image(torch.cat([x, z, x_hat])), paths[0], nrow=16)
    for prior in ("standard", "fitted"):
        samples, _ = generate(model_fn, model, 64, prior, gen)
        paths.append(os.path.join(args.out_dir, f"samples_{prior}.png"))
        save_image(to_image(samples), paths[-1], nrow=8)
    for path in paths:
        log(f"wrote {path}")


def score_prior_samples(model_fn, model, args, device):
    """--score-samples N: N decoded draws under each prior, scored by score.py: {prior: scores}."""
    draws = {prior: (lambda n, gen, prior=prior: to_image(generate(model_fn, model, n, prior, gen)[0]))
             for prior in ("standard", "fitted")}
    return {prior: draw_and_score(args, draw, device, f"z ~ the {prior} prior, one network pass per sample")
            for prior, draw in draws.items()}


# ---------------------------------------------------------------------------------------
# 7. Training
# ---------------------------------------------------------------------------------------

def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "vae_no_encoder", RESUMED_KEYS)
    torch.manual_seed(args.seed)
    train_x, _ = load_mnist(args.data_dir, train=True, device=device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)  # only now: bad input leaves no folder behind
    a = args.alpha_bar
    model = build_model(vars(args)).to(device)
    # The fitted prior depends only on the training digits and a: computed once, kept as buffers.
    prior_mean, prior_std = prior_at(*fit_prior(to_model_range(train_x)), a)
    model.prior_mean.copy_(prior_mean), model.prior_std.copy_(prior_std)
    opt = torch.optim.AdamW(model.net.parameters(), lr=args.lr, weight_decay=0.0, fused=fused_adam_ok(device))
    step = restore(ckpt, device, model=model, optimizer=opt) if ckpt else 0
    model_fn = make_model_fn(model.net, device, args.amp, args.compile)
    log(run_description(args, model, len(train_x), steps_per_epoch, total_steps, device))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def save():
        save_checkpoint(ckpt_path, "vae_no_encoder", args, step, step // steps_per_epoch, device,
                        model=model, ema=None, optimizer=opt)

    t_start, first_step = time.perf_counter(), step
    meter = Meter(step, total_steps, steps_per_epoch, args, device)
    model.train()
    try:
        while step < total_steps:
            for images in epoch_batches(train_x, step, steps_per_epoch, args):
                per_image_loss = noise_prediction_loss(model_fn, to_model_range(images), a, args.pred)
                opt.zero_grad(set_to_none=True)
                per_image_loss.mean().backward()
                opt.step()
                step += 1
                meter.add("eps-MSE", per_image_loss)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # pictures and checkpoint writes are not training throughput
                epoch = step // steps_per_epoch
                if (step % steps_per_epoch == 0 and epoch % args.sample_every == 0) or step >= total_steps:
                    save_samples(model_fn, model, args, device, epoch)
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)
    wall = time.perf_counter() - t_start
    model.eval()
    model.log_sigma.fill_(fit_decoder_sigma(model_fn, model, train_x, args, device))  # section 3, closed form
    save()  # again, now with the fitted decoder sigma
    finish(args, device, model, model_fn, test_x, meter, first_step, step, steps_per_epoch, wall)


def finish(args, device, model, model_fn, test_x, meter, first_step, step, steps_per_epoch, wall):
    """The end of a run: held-out metrics, the pictures, metrics.json and the summary lines."""
    images_per_sec = meter.images_per_sec((step - first_step) * args.batch_size, wall)
    train_loss = meter.last.get("eps-MSE", float("nan"))
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch, "train_loss": train_loss,
               "train_images_per_sec": images_per_sec,
               "seconds_per_epoch": steps_per_epoch * args.batch_size / images_per_sec if images_per_sec > 0 else None,
               "wall_time_s": wall, "device": describe(device),
               "parameters": sum(p.numel() for p in model.net.parameters())}
    metrics.update(evaluate(model_fn, model, test_x, args, device))
    save_pictures(model_fn, model, test_x, args, device)
    if args.score_samples:
        metrics["score"] = score_prior_samples(model_fn, model, args, device)
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train eps-MSE {train_loss:.4f} "
        f"| {images_per_sec:,.0f} train img/s | peak memory {metrics['peak_memory_mb']:.0f} MB")
    log(summary(metrics))


def run_description(args, model, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the model, the noise level, the prior and the run length."""
    n_params, a = sum(p.numel() for p in model.net.parameters()), args.alpha_bar
    return (f"vae_no_encoder: {n_params / 1e6:.3f}M parameters ({args.arch}, {args.channels} channels), "
            f"alpha_bar={a} (snr {a / (1 - a):.3g}), pred={args.pred}, prior={args.prior} | {n_train} train images, "
            f"batch {args.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps | device {device.type}, "
            f"compile={args.compile}, amp={args.amp}"
            + (f" | at the end: {args.score_samples} samples per prior scored" if args.score_samples else ""))


# ---------------------------------------------------------------------------------------
# 8. Evaluation, the sweep over noise levels, main()
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model_fn, model, test_x, args, device):
    """Held-out metrics over the whole test split, one z per digit:
    test_eps_mse  the training loss (mean over pixels of the squared noise error)
    test_x_mse    mean squared error of the reconstruction x0_hat, per pixel, on [-1, 1]
    test_bpd_standard / test_bpd_fitted   -ELBO in bits/dim with each prior: the discretized
                  decoder term (the same for both) + KL(q(z|x) || p(z)) (the only difference)."""
    a, batch = model.alpha_bar, max(args.batch_size, 256)
    generator = torch.Generator(device=device).manual_seed(args.seed + 3)
    sums = {"eps_mse": 0.0, "x_mse": 0.0, "recon": 0.0, "kl_standard": 0.0, "kl_fitted": 0.0}
    for i in range(0, len(test_x), batch):
        x = to_model_range(test_x[i:i + batch])
        eps = torch.randn(x.shape, device=x.device, generator=generator)
        z = corrupt(x, a, eps)
        x0_hat, eps_hat = predict_x0_eps(a, z, model_fn(z), model.parameterization)
        recon = -discretized_gaussian_log_likelihood(x, x0_hat.clamp(-1, 1), model.log_sigma)
        sums["eps_mse"] += ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3)).sum().item()
        sums["x_mse"] += ((x - x0_hat) ** 2).mean(dim=(1, 2, 3)).sum().item()
        sums["recon"] += recon.sum().item()
        for prior in ("standard", "fitted"):
            sums[f"kl_{prior}"] += prior_kl(x, a, *prior_params(model, prior)).sum().item()
    n = len(test_x)
    bits = 1.0 / (D * math.log(2.0))  # nats per image -> bits per dim
    m = {"test_eps_mse": sums["eps_mse"] / n, "test_x_mse": sums["x_mse"] / n,
         "decoder_sigma": math.exp(model.log_sigma.item()), "test_bpd_recon": sums["recon"] / n * bits}
    for prior in ("standard", "fitted"):
        m[f"test_bpd_kl_{prior}"] = sums[f"kl_{prior}"] / n * bits
        m[f"test_bpd_{prior}"] = m["test_bpd_recon"] + m[f"test_bpd_kl_{prior}"]
    m["test_images"] = n
    return m


def summary(m):
    return (f"test eps-MSE {m['test_eps_mse']:.4f} | x-MSE {m['test_x_mse']:.4f} (sigma {m['decoder_sigma']:.3f}) "
            f"| -ELBO {m['test_bpd_standard']:.3f} bits/dim with the standard prior, "
            f"{m['test_bpd_fitted']:.3f} with the fitted one (decoder {m['test_bpd_recon']:.3f} + KL "
            f"{m['test_bpd_kl_standard']:.3f} / {m['test_bpd_kl_fitted']:.3f})"
            + "".join(f" | FD {s['fd']:.2f} with the {prior} prior ({s['n']} samples)"
                      for prior, s in m.get("score", {}).items() if "fd" in s))


def sweep(args):
    """Load the checkpoints of --sweep DIR ..., order them by (arch, alpha_bar) and write
    sweep.png: one row per run, four blocks of 6 images each,
        corrupted test digits z | their reconstructions | decoded N(0, I) draws | decoded fitted-prior draws
    (the same test digits and the same underlying noise in every row), and sweep.json with
    every run's held-out numbers, recomputed here on the test split. A table is printed."""
    device = setup(args)
    runs = []
    for folder in args.sweep:
        ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"), "vae_no_encoder")
        model = build_model(ckpt["config"]).to(device).eval()
        model.load_state_dict(ckpt["model"])
        runs.append((ckpt["config"]["arch"], model.alpha_bar, folder, ckpt, model))
    runs.sort(key=lambda r: (r[0], -r[1]))
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    make_out_dir(args.out_dir)
    x = to_model_range(test_x[:6])
    rows, table = [], []
    log(f"{'arch':>5} {'alpha_bar':>9} {'pred':>4} {'epochs':>6} {'eps-MSE':>8} {'x-MSE':>7} "
        f"{'bpd standard':>12} {'bpd fitted':>10}  run")
    for arch, a, folder, ckpt, model in runs:
        model_fn = make_model_fn(model.net, device, args.amp, args.compile)
        m = evaluate(model_fn, model, test_x, args, device)
        pred = model.parameterization
        m.update({"run": folder, "arch": arch, "alpha_bar": a, "pred": pred, "step": ckpt["step"],
                  "epochs": ckpt["epoch"]})
        table.append(m)
        log(f"{arch:>5} {a:>9.3f} {pred:>4} {ckpt['epoch']:>6} {m['test_eps_mse']:>8.4f} {m['test_x_mse']:>7.4f} "
            f"{m['test_bpd_standard']:>12.3f} {m['test_bpd_fitted']:>10.3f}  {folder}")
        gen = torch.Generator(device=device).manual_seed(args.seed + 5)
        z, x_hat = denoise(model_fn, model, x, gen)
        blocks = [z, x_hat] + [generate(model_fn, model, 6, prior, gen)[0] for prior in ("standard", "fitted")]
        rows.append(torch.cat([torch.cat([to_image(b), torch.ones(1, 1, 28, 28)]) for b in blocks])[:-1])
    path = os.path.join(args.out_dir, "sweep.png")
    save_image(torch.cat(rows), path, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    write_json(table, os.path.join(args.out_dir, "sweep.json"))
    log(f"wrote {path}: one row per run (order above), blocks: z | reconstruction | N(0, I) draws | fitted-prior draws")


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        sweep(args)
    else:
        train(args)


# ---------------------------------------------------------------------------------------
# 9. What this tells us, and how DDPM fixes it
# ---------------------------------------------------------------------------------------
#
# Read the pictures of a sweep (sweep.png) from the top row (a near 1) to the bottom (a near 0).
#
# 1. Denoising gets harder as a falls. With little noise z still shows the digit and both
#    networks give it back almost exactly; the U-Net, whose skips hand the detail of z to the
#    output, does it better than the plain CNN, which must re-draw every stroke from 7 x 7
#    features. With much noise the reconstruction becomes a plausible but blurred digit:
#    several digits could have produced the same z, and the decoder mean, the best guess in
#    squared error, is their average. A Gaussian decoder cannot say "either this 3 or that 8";
#    it can only say "their average, give or take sigma".
# 2. Generation goes the other way. With little noise the prior is far from q(z): N(0, I)
#    draws have none of the dark background of a corrupted digit and the decoder, asked about
#    inputs it never saw, returns texture; the fitted prior gets the brightness of each pixel
#    right but not the strokes (its pixels are independent), so the decoder "denoises" speckle
#    into speckle. With much noise the prior matches q(z) well, but now the decoder blurs: its
#    outputs are averages over many digits, grey smudges in the middle of the frame.
# 3. The bound says the same in numbers. KL(q(z|x) || p(z)) shrinks as a -> 0 (z forgets x), the
#    decoder term grows (sigma grows with the reconstruction error), and no single a makes both
#    small: the trade-off of the two pictures is the trade-off of the two terms of the ELBO.
#    DDPM's bound on the same digits is far below any of these one-step bounds.
#
# The fault is not the network: it is one Gaussian step. p(x | z) is a single Gaussian, and
# the true posterior p(x | z) of a heavily corrupted digit is many-peaked (all the digits z
# could have come from). A Gaussian is only a good model of that posterior when the step is
# small: for a little noise, x given z is pinned to a small neighbourhood and close to Gaussian.
#
# DDPM (ddpm.py) keeps everything in this file and fixes exactly that. It chains T = 1000 of
# these corruptions, each adding a little noise (alpha_bar_t falls from ~1 to ~0), so that:
#   - the last z, x_{T-1}, is pure noise and N(0, I) is its exact prior (the prior term of the
#     bound is ~0: the problem of point 2 is gone);
#   - each reverse step p(x_{t-1} | x_t) only has to undo a little noise, where a Gaussian
#     is the right shape (the problem of point 1 is gone): the many-peaked choice between
#     digits is made gradually, a little at each step, by the noise injected along the way;
#   - every step is trained with the same loss as here, noise prediction at the step's level,
#     by one network told the level t (unet.py's time conditioning, switched off here).
# This file is ddpm.py with T = 1 and a free choice of where that one step lands.


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
    """The checks no single argparse type can make."""
    if args.sweep and args.resume:
        fail("--sweep evaluates finished runs; it does not combine with --resume")
    if args.sweep and args.score_samples:
        fail("--score-samples scores the run being trained; score a finished run with sample.py and score.py")
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


def open_unit_interval(text):
    """An argparse type for alpha-bar: a number strictly between 0 and 1. At a = 1 there is no
    noise (nothing to learn, and the weight (1 - a)/a of the bound is 0); at a = 0 the digit is
    gone from z (sqrt(a) x = 0: nothing to denoise, and x0_hat divides by sqrt(a))."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    if not 0.0 < value < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


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


def log_ndtr(x):
    """log Phi(x), the log of the standard normal CDF. torch.special.log_ndtr has no MPS kernel
    in many torch versions: on a Mac it is computed on the CPU and moved back."""
    if x.device.type == "mps":
        return torch.special.log_ndtr(x.cpu()).to(x.device)
    return torch.special.log_ndtr(x)


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
