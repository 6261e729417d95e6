"""
vae_no_encoder.py: a "VAE" whose encoder is not learned, the bridge from vae.py to ddpm.py.

vae.py learns an encoder q(z|x) and a decoder p(x|z). Here the encoder is a fixed, weight-free
corruption of the digit with Gaussian noise at one noise level a = alpha-bar (default 0.9):

    q(z | x) = N(sqrt(a) x, (1 - a) I),   i.e.  z = sqrt(a) x + sqrt(1 - a) eps,  eps ~ N(0, I)
    p(x | z) = N(mu_theta(z), sigma^2 I)  a network that denoises z (default: a plain CNN)
    p(z)     = a per-pixel Gaussian fitted to the corrupted training digits (default), or N(0, I)

z is a noisy 28 x 28 digit: one step of ddpm.py's forward process q(x_t | x_0). The ELBO then
reduces, up to a constant and a weight, to predicting the noise (section 3):

    -ELBO(x) = (1 - a) / (2 a sigma^2) * E || eps - eps_theta(z) ||^2  +  const(x)

so the defaults train the network on DDPM's simple loss at one noise level, then fit sigma.
Generation decodes a z drawn from the prior, and there one step fails (section 8): with little
noise the prior is nothing like the noisy digits it stands for; with much, the decoder blurs.

    python vae_no_encoder.py --data-dir ../shared/mnist --alpha-bar 0.9 --out-dir out/vne_cnn_0.9
    python vae_no_encoder.py --data-dir ../shared/mnist --alpha-bar 0.3 --arch unet --out-dir out/vne_unet_0.3
    python vae_no_encoder.py --eval-only --out-dir out/vne_cnn_0.9 --score-samples 1000   # FD per prior (score.py)
    python vae_no_encoder.py --data-dir ../shared/mnist --sweep out/vne_cnn_0.9 out/vne_unet_0.3 --out-dir out/vne_sweep

A run writes to --out-dir: ckpt.pt, samples_epoch_NNN.png (decoded draws from --prior), denoise.png
(test digits / their z / the reconstruction), samples_<prior>.png for both priors, metrics.json
(held-out bound in bits/dim with both priors, speed); --eval-only eval.json and eval_*.png.
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
    p = argparse.ArgumentParser(description="Train a VAE without encoder (a fixed one-step corruption) on MNIST.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/vae_no_encoder", help="checkpoint, pictures, metrics.json (or sweep.*)")
    g.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the network for training: for long runs (a cold compile costs about a minute)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast for the network (default: on CUDA only)")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    g.add_argument("--sample-every", type=positive_int, default=5, help="epochs between sample grids")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    g.add_argument("--score-samples", type=nonneg_int, default=0, help="at the end (also with --eval-only): "
                   "score N samples per prior with score.py (FD, IS, precision/recall; N >= 1000 for FDs that compare)")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt", help="score.py's classifier, for --score-samples")
    g.add_argument("--sweep", nargs="+", metavar="DIR", default=None, help="instead of training: compare the "
                   "runs in these folders (one per noise level / arch) in sweep.png and sweep.json in --out-dir")

    g = p.add_argument_group("model")
    g.add_argument("--alpha-bar", type=open_unit_interval, default=0.9,
                   help="noise level a of q(z|x) = N(sqrt(a) x, (1 - a) I), in (0, 1): 1 is no noise, 0 all noise")
    g.add_argument("--arch", choices=["cnn", "unet"], default="cnn",
                   help="decoder: plain CNN without skip connections, or unet.py's U-Net without time conditioning")
    g.add_argument("--channels", type=positive_int, default=16, help="width of the first level of either network")
    g.add_argument("--pred", choices=["eps", "x0"], default="eps", help="what the network predicts: noise or digit")
    g.add_argument("--prior", choices=["standard", "fitted"], default="fitted", help="p(z) of the grids and test_bpd")
    return p


# ---- 1. Networks: z (B, 1, 28, 28) -> (B, 1, 28, 28), eps_hat or x0_hat ------------------
# Two decoders, because the comparison is part of the lesson: cnn, a plain CNN 28 -> 14 -> 7 ->
# 14 -> 28 with NO skip connections, and unet, unet.py's U-Net without time conditioning (one
# noise level: nothing to condition on), whose skips carry the full detail of z to the output.
# With eps-prediction the output IS that fine detail (the noise, section 2): the U-Net copies it
# through its skips, the CNN must squeeze it through the 7 x 7 bottleneck.

def conv_block(cin, cout, stride=1, up=False):
    """3x3 conv (stride 2 halves H and W: 28 -> 14 -> 7), or if up a 4x4 transposed conv with
    stride 2 (7 -> 14 -> 28); then GroupNorm -> SiLU."""
    conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1) if up else nn.Conv2d(cin, cout, 3, stride, 1)
    return nn.Sequential(conv, nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


def make_network(arch, channels):
    c = channels
    if arch == "cnn":  # a convolutional autoencoder used as a denoiser: no skip or residual connections
        return nn.Sequential(
            conv_block(1, c), conv_block(c, 2 * c, stride=2),              # (B, 2c, 14, 14)
            conv_block(2 * c, 2 * c), conv_block(2 * c, 4 * c, stride=2),  # (B, 4c, 7, 7): the bottleneck
            conv_block(4 * c, 4 * c),
            conv_block(4 * c, 2 * c, up=True), conv_block(2 * c, 2 * c),   # (B, 2c, 14, 14)
            conv_block(2 * c, c, up=True), conv_block(c, c),               # (B, c, 28, 28)
            nn.Conv2d(c, 1, 3, padding=1))                                 # (B, 1, 28, 28)
    if arch == "unet":  # small on purpose: two levels 28 -> 14 -> 7, widths c, 2c, 2c, one block each
        return UNet(in_channels=1, out_channels=1, channels=c, channel_mult=(1, 2, 2), num_blocks=1,
                    attention=False, time_conditioning=False)
    raise ValueError(f"unknown arch {arch!r}: use 'cnn' or 'unet'")


class NoEncoderVAE(nn.Module):
    """The decoder network and, as buffers that the state_dict carries, the fitted constants:
    prior_mean, prior_std (1, 1, 28, 28), the fitted prior (section 4), and log_std (), log sigma of
    the decoder (section 3). No EMA (the checkpoint's "ema" is None): ddpm.py is where it pays."""

    def __init__(self, arch="cnn", channels=32, alpha_bar=0.9, parameterization="eps"):
        super().__init__()
        self.net = make_network(arch, channels)
        self.alpha_bar = float(alpha_bar)
        self.parameterization = parameterization
        self.register_buffer("prior_mean", torch.zeros(1, 1, 28, 28))
        self.register_buffer("prior_std", torch.ones(1, 1, 28, 28))
        self.register_buffer("log_std", torch.zeros(()))

    def forward(self, z):
        return self.net(z)


MODEL_KEYS = ("arch", "channels", "alpha_bar", "pred")
RESUMED_KEYS = MODEL_KEYS + ("seed", "batch_size", "lr")  # --resume takes these from the checkpoint


def build_model(config):
    """The model of a config dict (vars(args), or a checkpoint's); its buffers come from a state_dict."""
    return NoEncoderVAE(arch=config["arch"], channels=config["channels"], alpha_bar=config["alpha_bar"],
                        parameterization=config["pred"])


# ---- 2. The fixed "encoder" and what the network predicts --------------------------------

def to_model_range(images_u8):
    """uint8 (B, 28, 28) in 0..255 -> float (B, 1, 28, 28) in [-1, 1]: x = k / 127.5 - 1."""
    return images_u8.unsqueeze(1).float() / 127.5 - 1


def corrupt(x, a, eps):
    """z ~ q(z | x) = N(sqrt(a) x, (1 - a) I) by reparameterisation (Ho et al. 2020, eq. 4 at one t).
    Shrinking x by sqrt(a) while adding noise of variance 1 - a keeps Var[z] near 1 for data
    of variance near 1: the noise replaces signal rather than piling on top of it."""
    return math.sqrt(a) * x + math.sqrt(1 - a) * eps


def estimate_x0_eps(a, z, out, parameterization):
    """(x0_hat, eps_hat) from the network output, the two tied by z = sqrt(a) x0 + sqrt(1 - a) eps
    (ddpm.py's predict_x0_eps at a single noise level a); x0_hat is the decoder mean mu_theta(z).
    eps: x0_hat = z minus the predicted noise, a global skip connection for free, but an eps-error
    becomes an x-error sqrt((1 - a)/a) times its size. x0: a clean digit, smooth and compressible,
    suits a bottleneck. Weighted as in section 3 both optimise the same number: only the job differs."""
    if parameterization == "eps":
        return (z - math.sqrt(1 - a) * out) / math.sqrt(a), out
    if parameterization == "x0":
        return out, (z - math.sqrt(a) * out) / math.sqrt(1 - a)
    raise ValueError(f"unknown prediction target {parameterization!r}: use 'eps' or 'x0'")


@torch.no_grad()
def denoise(model_fn, model, x, generator=None):
    """Corrupt clean digits x once and decode once: (eps, z, x0_hat, eps_hat), x0_hat unclipped."""
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    z = corrupt(x, model.alpha_bar, eps)
    return (eps, z) + estimate_x0_eps(model.alpha_bar, z, model_fn(z), model.parameterization)


# ---- 3. The ELBO, and why it is "predict the noise" --------------------------------------
# The ELBO of vae.py (Kingma & Welling eq. 3), ELBO(x) = E_q(z|x)[log p(x | z)] - KL(q(z | x) || p(z)),
# with q fixed: the KL has no weights in it (the prior is fixed, or fitted once from data,
# section 4), so training the decoder only touches the first term. With the Gaussian decoder
# N(mu_theta(z), sigma^2 I) over the D pixels,
#   log p(x | z) = -D/2 log(2 pi sigma^2) - || x - mu_theta(z) ||^2 / (2 sigma^2).
# Write the mean through a noise predictor, mu_theta(z) = (z - sqrt(1 - a) eps_theta(z)) / sqrt(a)
# (section 2), and put in z = sqrt(a) x + sqrt(1 - a) eps: x - mu_theta(z) = sqrt((1 - a) / a)
# (eps_theta(z) - eps), and therefore
#
#   -ELBO(x) = (1 - a) / (2 a sigma^2)  E_eps || eps - eps_theta(z) ||^2   +  D/2 log(2 pi sigma^2)
#              `---- weight = 1 / (2 sigma^2 snr), snr = a / (1 - a) ----'     + KL(q(z|x) || p(z))
#
# The last two terms do not depend on the network, so for a fixed sigma maximising the ELBO is
# minimising the noise-prediction MSE: Ho et al.'s simple loss (eq. 14) at a single t, where
# the weight is one constant and can be dropped. For a given network the best sigma is the
# root of the mean squared x-error, fitted in closed form after training (fit_decoder_log_std).

def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def prior_kl(x, a, prior_mean, prior_std):
    """KL(q(z | x) || p(z)) per image, summed over pixels: (B, 1, 28, 28) -> (B,).
    q(z|x) = N(sqrt(a) x, 1 - a) and p(z) = N(prior_mean, prior_std^2), both per pixel."""
    log_var_q = torch.full_like(x, math.log(1 - a))
    return normal_kl(math.sqrt(a) * x, log_var_q, prior_mean, 2 * torch.log(prior_std)).sum(dim=(1, 2, 3))


def reconstruction_nll_from_noise(eps, eps_hat, a, log_std):
    """-log p(x | z) per image under N(mu_theta(z), sigma^2 I), sigma = e^log_std, written through the
    noise (the reduction above): (1 - a)/(2 a sigma^2) ||eps - eps_hat||^2 + D/2 log(2 pi sigma^2)."""
    var, d = torch.exp(2 * log_std), eps[0].numel()
    sq = ((eps - eps_hat) ** 2).sum(dim=(1, 2, 3))
    return (1 - a) / (2 * a * var) * sq + 0.5 * d * torch.log(2 * math.pi * var)


def noise_prediction_loss(model_fn, x, a, parameterization, generator=None):
    """The training loss, per image: mean over pixels of ||eps - eps_hat||^2.  (B,1,28,28) -> (B,)
    For --pred x0 the same number from the x-error, ||eps - eps_hat||^2 = snr ||x - x0_hat||^2,
    snr = a/(1 - a) (section 3): both targets optimise and report the same quantity."""
    eps = torch.randn(x.shape, device=x.device, generator=generator)
    z = corrupt(x, a, eps)
    out = model_fn(z)
    if parameterization == "eps":
        return ((out - eps) ** 2).mean(dim=(1, 2, 3))
    if parameterization == "x0":
        return a / (1 - a) * ((out - x) ** 2).mean(dim=(1, 2, 3))
    raise ValueError(f"unknown prediction target {parameterization!r}: use 'eps' or 'x0'")


@torch.no_grad()
def fit_decoder_log_std(model_fn, model, train_x, batch_size, generator):
    """log sigma of the decoder: the maximum-likelihood scalar for a Gaussian decoder,
    sigma^2 = mean squared error ||x - x0_hat||^2 / D over the training digits (one z each)."""
    batch, total, count = max(batch_size, 256), 0.0, 0
    for i in range(0, len(train_x), batch):
        x = to_model_range(train_x[i:i + batch])
        _, _, x0_hat, _ = denoise(model_fn, model, x, generator)
        total += ((x - x0_hat) ** 2).sum().item()
        count += x.numel()
    return 0.5 * math.log(total / count)


# ---- 4. Priors ---------------------------------------------------------------------------
# Samples are only as good as the match between p(z) and the aggregate posterior q(z) =
# E_x q(z | x) the decoder was trained on: training digits shrunk by sqrt(a), plus noise.
# standard  N(0, I), the prior of vae.py and ddpm.py. MNIST in [-1, 1] is mostly background
#           at -1, so a corner pixel of z has mean ~ -sqrt(a) and variance ~ 1 - a, not 0 and 1:
#           only as a -> 0 does q(z) -> N(0, I). A draw at a = 0.9 is no corrupted digit.
# fitted    the best diagonal Gaussian for q(z) (moment matching). It knows where ink usually
#           is, but not that the pixels of one digit go together (no correlations), so with
#           little noise its draws are independent speckle, not strokes.

def fit_prior(train_x, a):
    """(mean, std) of the fitted prior at level a, (1, 1, 28, 28): mean sqrt(a) mu_j, variance a s_j^2 + (1 - a)
    (scaled digit plus independent noise), mu_j, s_j^2 the moments of pixel j over the training digits."""
    x = train_x.double()
    mu, s = x.mean(dim=0, keepdim=True).float(), x.var(dim=0, unbiased=False, keepdim=True).sqrt().float()
    return math.sqrt(a) * mu, (a * s ** 2 + (1 - a)).sqrt()


def prior_params(model, prior):
    """(mean, std) of the chosen prior as tensors on the model's device, (1, 1, 28, 28)."""
    if prior == "standard":
        return torch.zeros_like(model.prior_mean), torch.ones_like(model.prior_std)
    if prior == "fitted":
        return model.prior_mean, model.prior_std
    raise ValueError(f"unknown prior {prior!r}: use 'standard' or 'fitted'")


# ---- 5. The held-out bound in bits/dim ---------------------------------------------------
# The data are 8-bit, x = k/127.5 - 1, and a density on them is no likelihood: the held-out
# bound uses ddpm.py's L_0 decoder, the probability of x's pixel bin under N(mu_theta(z),
# sigma^2), so -ELBO is an upper bound on -log P(x) of the discrete digits, in ddpm.py's units.

def log_ndtr(x):
    """log Phi(x), the log of the standard normal CDF. torch.special.log_ndtr has no MPS kernel
    in many torch versions: on a Mac it is computed on the CPU and moved back."""
    if x.device.type == "mps":
        return torch.special.log_ndtr(x.cpu()).to(x.device)
    return torch.special.log_ndtr(x)


def log_normal_cdf_diff(lo, hi):
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails (Phi = standard normal CDF).

    In the right tail, Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi), which keeps both CDFs small
    and so in the range where log_ndtr is exact; then log(a - b) = log a + log(1 - b/a)."""
    flip = lo > 0
    a, b = torch.where(flip, -lo, hi), torch.where(flip, -hi, lo)
    log_a, log_b = log_ndtr(a), log_ndtr(b)
    return log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-1e-12)))


def discretized_gaussian_log_likelihood(x, mean, log_var):
    """log P(pixel bin of x) under N(mean, e^log_var) (Ho et al. sec. 3.3, eq. 13).

    x holds 8-bit values scaled to [-1, 1]; the bin of x is [x - 1/255, x + 1/255], except at
    the edges where the bin of -1 extends to -inf and the bin of +1 to +inf, so the 256
    probabilities sum to exactly one."""
    inv_std = torch.exp(-0.5 * log_var)
    lo = (x - mean - 1.0 / 255) * inv_std
    hi = (x - mean + 1.0 / 255) * inv_std
    log_cdf_hi = log_ndtr(hi)           # bin (-inf, x + 1/255] at x = -1
    log_sf_lo = log_ndtr(-lo)           # bin [x - 1/255, inf)  at x = +1
    mid = log_normal_cdf_diff(lo, hi)
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, mid))


# ---- 6. Generation: decode a draw from the prior -----------------------------------------

@torch.no_grad()
def generate(model_fn, model, n, prior, generator=None):
    """n samples in [-1, 1]: z ~ p(z), then the decoder mean x0_hat(z) (not mean + sigma noise:
    sigma is the size of the decoder's error, and adding it would only show speckle)."""
    mean, std = prior_params(model, prior)
    z = mean + std * torch.randn((n, 1, 28, 28), device=mean.device, generator=generator)
    x0_hat, _ = estimate_x0_eps(model.alpha_bar, z, model_fn(z), model.parameterization)
    return x0_hat.clamp(-1, 1), z


def to_image(x):
    """[-1, 1] -> [0, 1] on the CPU, for save_image (z can leave [-1, 1]: clipped for display)."""
    return ((x + 1) / 2).clamp(0, 1).cpu()


# ---- 7. Training, evaluation, main() -----------------------------------------------------

def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "vae_no_encoder", RESUMED_KEYS)
    torch.manual_seed(args.seed)
    train_x, _ = load_mnist(args.data_dir, train=True, device=device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)  # only now: bad input leaves no folder behind
    model = build_model(vars(args)).to(device)
    prior_mean, prior_std = fit_prior(to_model_range(train_x), args.alpha_bar)  # depends on the data and a only
    model.prior_mean.copy_(prior_mean), model.prior_std.copy_(prior_std)
    opt = torch.optim.AdamW(model.net.parameters(), lr=args.lr, weight_decay=0.0, fused=fused_adam_ok(device))
    step = restore(ckpt, device, model=model, optimizer=opt) if ckpt else 0
    train_fn = make_model_fn(model.net, device, args.amp, args.compile)
    model_fn = make_model_fn(model.net, device, args.amp)  # grids, evaluation, samples: eager, as in ddpm.py
    log(run_description(args, model, len(train_x), steps_per_epoch, total_steps, device))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def save():
        save_checkpoint(ckpt_path, "vae_no_encoder", args, step, step // steps_per_epoch, device,
                        model=model, ema=None, optimizer=opt)

    t_start, first_step = time.perf_counter(), step
    meter = Meter(step, total_steps, steps_per_epoch, args.batch_size, args.log_every, device)
    model.train()
    try:
        while step < total_steps:
            for (images,) in epoch_batches((train_x,), step, steps_per_epoch, args.batch_size, args.seed):
                loss = noise_prediction_loss(train_fn, to_model_range(images), args.alpha_bar, args.pred)  # (B,)
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                opt.step()
                step += 1
                meter.add("eps-MSE", loss)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # pictures and checkpoint writes are not training throughput
                epoch = step // steps_per_epoch
                if (step % steps_per_epoch == 0 and epoch % args.sample_every == 0) or step >= total_steps:
                    save_grid(model_fn, model, args.prior, os.path.join(args.out_dir, f"samples_epoch_{epoch:03d}.png"),
                              torch.Generator(device=device).manual_seed(args.seed + SEED_GRID))  # the same z each time
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)
    wall = time.perf_counter() - t_start
    model.eval()
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL)
    model.log_std.fill_(fit_decoder_log_std(model_fn, model, train_x, args.batch_size, gen))  # section 3
    save()  # again, now with the fitted decoder sigma
    finish(args, device, model, model_fn, test_x, meter, first_step, step, steps_per_epoch, wall)


@torch.no_grad()
def evaluate(model_fn, model, test_x, args, device):
    """Held-out metrics, one z per test digit: test_eps_mse (the training loss), test_x_mse (per pixel),
    -ELBO in bits/dim with each prior, test_bpd_<prior> = test_bpd_decoder (the discretized decoder's
    term) + test_bpd_prior_<prior> (KL(q(z|x) || p(z)), the only difference); test_bpd: with --prior."""
    a, batch = model.alpha_bar, max(args.batch_size, 256)
    generator = torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL)
    sums = {"eps_mse": 0.0, "x_mse": 0.0, "decoder": 0.0, "prior_standard": 0.0, "prior_fitted": 0.0}
    for i in range(0, len(test_x), batch):
        x = to_model_range(test_x[i:i + batch])
        eps, _, x0_hat, eps_hat = denoise(model_fn, model, x, generator)
        decoder = -discretized_gaussian_log_likelihood(x, x0_hat.clamp(-1, 1), 2 * model.log_std)
        sums["eps_mse"] += ((eps - eps_hat) ** 2).mean(dim=(1, 2, 3)).sum().item()
        sums["x_mse"] += ((x - x0_hat) ** 2).mean(dim=(1, 2, 3)).sum().item()
        sums["decoder"] += decoder.sum().item()
        for prior in ("standard", "fitted"):
            sums[f"prior_{prior}"] += prior_kl(x, a, *prior_params(model, prior)).sum().item()
    n, bits = len(test_x), 1.0 / (D * math.log(2.0))  # nats per image -> bits per dim
    m = {"test_eps_mse": sums["eps_mse"] / n, "test_x_mse": sums["x_mse"] / n,
         "decoder_std": math.exp(model.log_std.item()), "test_bpd_decoder": sums["decoder"] / n * bits}
    for prior in ("standard", "fitted"):
        m[f"test_bpd_prior_{prior}"] = sums[f"prior_{prior}"] / n * bits
        m[f"test_bpd_{prior}"] = m["test_bpd_decoder"] + m[f"test_bpd_prior_{prior}"]
    m["test_bpd"], m["test_images"] = m[f"test_bpd_{args.prior}"], n
    return m


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        sweep(args)
    elif args.eval_only:
        eval_only(args)
    else:
        train(args)


# ---- 8. What this tells us, and how DDPM fixes it ----------------------------------------
# Read a sweep's picture (sweep.png) from the top row (a near 1) to the bottom (a near 0).
# 1. Denoising gets harder as a falls: several digits could have produced z, and the decoder
#    mean is their blurred average. A Gaussian decoder cannot say "either this 3 or that 8".
# 2. Generation goes the other way: with little noise the prior is far from q(z) and the decoder
#    returns texture or speckle; with much noise the prior matches, but the decoder blurs.
# 3. The bound says the same: KL(q(z|x) || p(z)) shrinks as a -> 0, the decoder term grows,
#    and no single a makes both small. The fault is the one Gaussian step: the posterior of a
#    heavily corrupted digit is many-peaked, and a Gaussian fits it only when the step is small.
# DDPM (ddpm.py) keeps everything in this file and chains T = 1000 small corruptions: x_{T-1}
# is pure noise, so N(0, I) is its exact prior (point 2 gone); each reverse step undoes a little
# noise, where a Gaussian is the right shape, the choice between digits made gradually (point 1
# gone); every step is trained with this file's loss at its own level, by one network told t
# (unet.py's time conditioning). This file is ddpm.py with T = 1 and a free choice of that step.


# ==== Extensions: the sweep over noise levels, the pictures ===============================

def sweep(args):
    """--sweep DIR ...: each run's held-out numbers on the test split (a table, sweep.json), and
    sweep.png, one row per run by (arch, alpha_bar) of 6 images per block: test digits' z | their
    reconstructions | N(0, I) draws | fitted-prior draws (the same digits and noise in every row)."""
    device = setup(args)
    runs = sorted((load_run(folder, device, args) for folder in args.sweep),
                  key=lambda r: (r[0]["config"]["arch"], -r[1].alpha_bar))
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    make_out_dir(args.out_dir)
    x, rows, table = to_model_range(test_x[:6]), [], []
    log(f"{'arch':>5} {'alpha_bar':>9} {'pred':>4} {'epochs':>6} {'eps-MSE':>8} {'x-MSE':>7} "
        f"{'bpd standard':>12} {'bpd fitted':>10}  run")
    for ckpt, model, model_fn, folder in runs:
        arch, a, pred = ckpt["config"]["arch"], model.alpha_bar, model.parameterization
        m = {**evaluate(model_fn, model, test_x, args, device), "run": folder, "arch": arch, "alpha_bar": a,
             "pred": pred, "step": ckpt["step"], "epochs": ckpt["epoch"]}
        table.append(m)
        log(f"{arch:>5} {a:>9.3f} {pred:>4} {ckpt['epoch']:>6} {m['test_eps_mse']:>8.4f} {m['test_x_mse']:>7.4f} "
            f"{m['test_bpd_standard']:>12.3f} {m['test_bpd_fitted']:>10.3f}  {folder}")
        gen = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID)
        _, z, x_hat, _ = denoise(model_fn, model, x, gen)
        blocks = [z, x_hat] + [generate(model_fn, model, 6, prior, gen)[0] for prior in ("standard", "fitted")]
        rows.append(torch.cat([torch.cat([to_image(b), torch.ones(1, 1, 28, 28)]) for b in blocks])[:-1])
    path = os.path.join(args.out_dir, "sweep.png")
    save_image(torch.cat(rows), path, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    write_json(table, os.path.join(args.out_dir, "sweep.json"))
    log(f"wrote {path}: one row per run (order above), blocks: z | reconstruction | N(0, I) draws | fitted-prior draws")


def save_pictures(model_fn, model, test_x, args, device, prefix=""):
    """denoise.png (digits / z / reconstruction) and samples_<prior>.png; returns the last grid's images/s."""
    gen, x = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID), to_model_range(test_x[:16])
    _, z, x_hat, _ = denoise(model_fn, model, x, gen)
    path = os.path.join(args.out_dir, f"{prefix}denoise.png")
    save_image(to_image(torch.cat([x, z, x_hat])), path, nrow=16)
    log(f"wrote {path}")
    for prior in ("standard", "fitted"):
        speed = save_grid(model_fn, model, prior, os.path.join(args.out_dir, f"{prefix}samples_{prior}.png"), gen)
    return speed


# ==== Run plumbing of this script =========================================================

def open_unit_interval(text):
    """An argparse type for alpha-bar, a number strictly in (0, 1): at a = 1 there is no noise
    (nothing to learn), at a = 0 no digit in z (and x0_hat divides by sqrt(a))."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def check_args(args):
    """The checks no single argparse type can make."""
    if sum(map(bool, (args.sweep, args.eval_only, args.resume))) > 1:
        fail("--sweep, --eval-only and --resume exclude each other (--sweep and --eval-only read finished runs)")
    if args.score_samples and args.sweep:
        fail("--score-samples scores the run being trained or evaluated (--eval-only), not a --sweep")
    if args.score_samples:
        try:
            import score
        except ImportError:
            fail("--score-samples needs score.py, this project's sample scorer, beside this script")
        score.check_classifier(args.classifier, args.data_dir)


def load_run(folder, device, args):
    """(checkpoint, model, model_fn, folder) of the run in folder, the model in eval mode."""
    ckpt = load_checkpoint(os.path.join(folder, "ckpt.pt"), "vae_no_encoder")
    model = build_model(ckpt["config"]).to(device).eval()
    model.load_state_dict(ckpt["model"])
    return ckpt, model, make_model_fn(model.net, device, args.amp), folder


def eval_only(args):
    """Evaluate out-dir/ckpt.pt with the run's settings: held-out bound, eval_*.png, --score-samples, eval.json."""
    device = setup(args)
    ckpt, model, model_fn, _ = load_run(args.out_dir, device, args)
    for key in RESUMED_KEYS + ("prior",):
        setattr(args, key, ckpt["config"][key])
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {os.path.join(args.out_dir, 'ckpt.pt')} (step {ckpt['step']})")
    report({"checkpoint": os.path.join(args.out_dir, "ckpt.pt"), "step": ckpt["step"], "device": describe(device)},
           model_fn, model, test_x, args, device, "eval.json", prefix="eval_")


def finish(args, device, model, model_fn, test_x, meter, first_step, step, steps_per_epoch, wall):
    """The end of a run: the summary of training, then report() into metrics.json."""
    images_per_sec = meter.images_per_sec((step - first_step) * args.batch_size, wall)
    train_loss = meter.last.get("eps-MSE", float("nan"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train eps-MSE {train_loss:.4f} | {images_per_sec:,.0f} train img/s")
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch, "train_loss": train_loss,
               "train_images_per_sec": images_per_sec, "wall_time_s": wall, "device": describe(device),
               "parameters": sum(p.numel() for p in model.net.parameters())}
    report(metrics, model_fn, model, test_x, args, device, "metrics.json")


def report(metrics, model_fn, model, test_x, args, device, name, prefix=""):
    """Held-out metrics, pictures, --score-samples and peak memory into metrics, out-dir/name; a summary line."""
    metrics.update(evaluate(model_fn, model, test_x, args, device))
    metrics["sample_images_per_sec"] = save_pictures(model_fn, model, test_x, args, device, prefix)
    if args.score_samples:
        metrics["score"] = score_run(model_fn, model, args, device)
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, name))
    m = metrics
    log(f"test eps-MSE {m['test_eps_mse']:.4f} | x-MSE {m['test_x_mse']:.4f} (sigma {m['decoder_std']:.3f}) "
        f"| -ELBO {m['test_bpd_standard']:.3f} bits/dim with the standard prior, {m['test_bpd_fitted']:.3f} with "
        f"the fitted one (decoder {m['test_bpd_decoder']:.3f} + prior {m['test_bpd_prior_standard']:.3f} / "
        f"{m['test_bpd_prior_fitted']:.3f}) | peak memory {m['peak_memory_mb']:.0f} MB"
        + "".join(f" | FD {s['fd']:.2f} with the {prior} prior ({s['n']} samples)"
                  for prior, s in m.get("score", {}).items() if "fd" in s))


def run_description(args, model, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the model, the noise level, the prior and the run length."""
    n_params, a = sum(p.numel() for p in model.net.parameters()), args.alpha_bar
    return (f"vae_no_encoder: {n_params / 1e6:.3f}M parameters ({args.arch}, {args.channels} channels), alpha_bar={a} "
            f"(snr {a / (1 - a):.3g}), pred={args.pred}, prior={args.prior} | {n_train} train images, batch {args.batch_size}, "
            f"{steps_per_epoch} steps/epoch, {total_steps} steps | device {device.type}, compile={args.compile}, amp={args.amp}"
            + (f" | at the end: {args.score_samples} samples per prior scored" if args.score_samples else ""))


def save_grid(model_fn, model, prior, path, generator):
    """64 decoded draws from the prior as an 8 x 8 grid at path; returns the sampling speed in images/s."""
    t0 = time.perf_counter()
    images = to_image(generate(model_fn, model, 64, prior, generator)[0])  # .cpu() waits for the device
    speed = 64 / (time.perf_counter() - t0)
    save_image(images, path, nrow=8)
    log(f"wrote {path} ({prior} prior)")
    return speed


def score_run(model_fn, model, args, device):
    """--score-samples N: N decoded draws under each prior, scored by score.py: {prior: scores}."""
    import score  # only here: without --score-samples this script runs without score.py
    return {prior: score.draw_and_score(lambda n, gen, prior=prior: to_image(generate(model_fn, model, n, prior, gen)[0]),
                                        args.score_samples, device, f"z ~ the {prior} prior, one network pass per sample",
                                        args.classifier, args.data_dir, args.seed) for prior in ("standard", "fitted")}


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
