"""
ddpm.py: Denoising Diffusion Probabilistic Models on MNIST, from scratch, in one file.

A diffusion model (Sohl-Dickstein et al. 2015; Ho et al. 2020) destroys a digit in T small
steps of Gaussian noise and learns to undo one step at a time. Time indices in this file are
0-based, t = 0 .. T-1, and the digit itself is x0: code step t is the paper's step t + 1, so the
code's x_t at t = 0 is the paper's x_1 (noised once), x_{T-1} is (almost) pure noise, and
x_{-1} in the formulas means the digit x0. With these indices:

    forward  q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)   t = 0 .. T-1  (fixed, no weights)
    closed   q(x_t | x0)      = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I),  alpha_bar_t = prod_{s<=t} (1 - beta_s)
    reverse  p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)        t = T-1 .. 0  (learned: a U-Net)

Training maximises a variational bound on log p(x0). Written through the noise eps that made
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, the bound becomes, up to weights, a
regression (Ho eq. 14). What this file runs by default:

    - the cosine schedule of alpha_bar_t (Nichol & Dhariwal 2021),
    - a network that predicts v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho
      2022), trained with the weight that makes its loss exactly the eps loss of Ho eq. 14:
          L = E_{t, x0, eps} alpha_bar_t || v - v_theta(x_t, t) ||^2 = E || eps - eps_theta(x_t, t) ||^2,
    - an exponential moving average (EMA) of the weights, which draws the samples,
    - DDIM sampling (Song et al. 2021) in 50 steps with eta = 1: every step draws fresh noise, as
      ancestral sampling does (eta = 0 is the deterministic DDIM, one digit per starting noise).

The same bound, evaluated on held-out digits, is an upper bound on the negative log-likelihood,
in bits/dim.

Run:
    python ddpm.py --epochs 100                                  # the default model (a GPU)
    python ddpm.py --data-dir ../shared/mnist --channels 16 --batch-size 32 --lr 1e-3 --minutes 10 --eval-images 0
                                                                 # a CPU: readable digits in 10 minutes
    python ddpm.py --resume --epochs 150                         # continue a run
    python ddpm.py --eval-only --eval-images 1000                 # bits/dim of out/ddpm/ckpt.pt

Writes to --out-dir (default out/ddpm): ckpt.pt (raw + EMA weights, optimizer, step, RNG),
samples_epoch_NNN.png (from the EMA weights), metrics.json (config, losses, bits/dim, speed).

Sections 0-9 are the algorithm, then the extensions (guidance, inpainting, speed on GPUs,
torchrun), this script's run plumbing, and the appendix shared by every script.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch

from unet import DiT, UNet


def make_parser():
    """The knobs: every default of a run, on one screen. `python ddpm.py --help` lists them."""
    p = argparse.ArgumentParser(description="Train or evaluate a DDPM on MNIST.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/ddpm", help="checkpoint, sample grids, metrics.json")
    g.add_argument("--epochs", type=positive_int, default=100, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=256, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup-steps", type=positive_int, default=500, help="linear learning-rate warm-up")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="after the warm-up: constant, or a cosine down to 0 at the run's planned end")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--minutes", type=positive_float, default=None, help="stop after this much time (grids and checkpoints count), summed over --resume")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training network: for long runs (a cold compile costs about a minute)")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="record the training step as a CUDA graph and replay it (default: on CUDA, one process)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA only)")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    g.add_argument("--sample-every", type=positive_int, default=10, help="epochs between sample grids")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    g.add_argument("--eval-images", type=nonneg_int, default=256, help="test digits for the bound (T network calls each)")
    g = p.add_argument_group("model (each backbone's flags; its defaults in BACKBONES)")
    g.add_argument("--arch", choices=["unet", "dit"], default="unet",
                   help="the denoising network: a U-Net, or a Diffusion Transformer (unet.py)")
    g.add_argument("--block", choices=["resnet", "shuffle"], default=None, help="unet: the residual block (default resnet)")
    g.add_argument("--channels", type=positive_int, default=None, help="unet: width of the first level (default 32)")
    g.add_argument("--channel-mult", default=None, help="unet: width multiplier per level, 28 -> 14 -> 7 (default 1,2,2)")
    g.add_argument("--num-blocks", type=positive_int, default=None, help="unet: residual blocks per level (default 2)")
    g.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="unet: self-attention at 7x7 (default on)")
    g.add_argument("--dropout", type=float, default=None, help="unet: dropout in the residual blocks (default 0)")
    g.add_argument("--patch-size", type=positive_int, default=None, help="dit: p x p pixels per token, p divides 28 (default 4)")
    g.add_argument("--width", type=positive_int, default=None, help="dit: the transformer's width (default 128)")
    g.add_argument("--depth", type=positive_int, default=None, help="dit: transformer blocks (default 6)")
    g.add_argument("--heads", type=positive_int, default=None, help="dit: attention heads (default 4)")
    g.add_argument("--class-cond", action=argparse.BooleanOptionalAction, default=False,
                   help="condition on the digit's label (classifier-free guidance)")
    g.add_argument("--p-uncond", type=float, default=0.1, help="--class-cond: probability of dropping a training label")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="cosine",
                   help="noise schedule: Ho et al.'s linear betas, or Nichol & Dhariwal's cosine alpha-bar")
    g.add_argument("--timesteps", type=positive_int, default=1000, help="T")
    g.add_argument("--pred", choices=["eps", "x0", "v"], default="v", help="what the network predicts")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="maximum EMA decay (warmed up from 0)")
    g.add_argument("--min-snr-gamma", type=number_at_least(float, 0), default=0.0,
                   help="Min-SNR-gamma loss weighting (Hang et al. 2023); 0: the plain eps-loss weight")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="DDIM, or ancestral DDPM (all T steps)")
    g.add_argument("--sample-steps", type=positive_int, default=None, help="DDIM steps (default 50, or T if fewer)")
    g.add_argument("--eta", type=float, default=None, help="DDIM noise (default 1, as DDPM; 0: deterministic)")
    g.add_argument("--num-samples", type=positive_int, default=64, help="images per grid (--class-cond: a row per class)")
    g.add_argument("--guidance", type=float, default=0.0, help="--class-cond: guidance weight w (0: the conditional model)")
    g.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end: score N samples with score.py (FD, IS, precision/recall); 0: off")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt", help="score.py's digit classifier")
    return p


# The flags that define a trained model (a resumed or evaluated run takes them from its
# checkpoint), and those that a resumed run keeps so that it continues the same run.
MODEL_KEYS = ("arch", "block", "channels", "channel_mult", "num_blocks", "attention", "dropout", "patch_size", "width",
              "depth", "heads", "schedule", "timesteps", "pred", "class_cond")
BACKBONES = {  # each backbone's own flags and their defaults (a flag of the other one is refused)
    "unet": {"block": "resnet", "channels": 32, "channel_mult": "1,2,2", "num_blocks": 2, "attention": True, "dropout": 0.0},
    "dit": {"patch_size": 4, "width": 128, "depth": 6, "heads": 4},
}
RUN_KEYS = ("seed", "batch_size", "lr", "warmup_steps", "lr_schedule", "grad_clip", "ema_decay", "min_snr_gamma",
            "p_uncond")


# ---------------------------------------------------------------------------------------
# 0. The data and the network
# ---------------------------------------------------------------------------------------
# The pixels are 8-bit values k = 0..255; the model sees them as x = k / 127.5 - 1 in
# [-1, 1], the range of the unit-variance noise it is mixed with.

def to_model_range(images_u8):
    """uint8 (B, 28, 28) in 0..255 -> float (B, 1, 28, 28) in [-1, 1]: x = k / 127.5 - 1."""
    return images_u8.unsqueeze(1).float() / 127.5 - 1


def parse_channel_mult(text):
    try:
        mult = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        mult = ()
    if not mult or min(mult) < 1:
        raise ValueError(f"--channel-mult must be comma-separated positive integers, got {text!r}")
    return mult


def build_model(config):
    """unet.py's network described by a config dict (the argparse namespace, or a checkpoint's): the
    U-Net, or with --arch dit the Diffusion Transformer (Peebles & Xie 2023), the same interface:
    (B, 1, 28, 28) noisy image, (B,) timesteps [, (B,) labels] -> (B, 1, 28, 28) prediction."""
    arch, block = config["arch"], config.get("block")
    if arch in ("resnet", "shuffle"):  # a checkpoint from before the DiT, when --arch named the U-Net's block
        arch, block = "unet", arch
    labels = 10 if config["class_cond"] else None
    if arch == "dit":
        return DiT(in_channels=1, out_channels=1, image_size=28, patch_size=config["patch_size"], width=config["width"],
                   depth=config["depth"], heads=config["heads"], num_classes=labels)
    return UNet(in_channels=1, out_channels=1, channels=config["channels"],
                channel_mult=parse_channel_mult(config["channel_mult"]), num_blocks=config["num_blocks"],
                attention=config["attention"], dropout=config["dropout"], block=block, num_classes=labels)


# From section 4 on, the math calls the network as model_fn(x_t, t) -> prediction, (B, 1, 28, 28):
# the network as make_model_fn (the appendix) wraps it, in bf16 autocast if --amp, compiled if
# --compile, its output always float32, so the math around it stays fp32. With --class-cond the
# network also takes labels, and with_labels (extension A) binds them: model_fn(x_t, t) again.


# ---------------------------------------------------------------------------------------
# 1. Noise schedules
# ---------------------------------------------------------------------------------------
# beta_t is the variance of the noise added at step t. All schedule math is done in float64
# (alpha_bar is a product of 1000 numbers close to 1) and stored as float32. The default is
# the cosine schedule: with v-prediction it reached the linear schedule's sample quality in
# about half the training time (docs/ddpm.md); with eps-prediction it was the other way round.

def linear_betas(T):
    """Ho et al. 2020: beta linear from 1e-4 to 0.02 for T = 1000.

    For other T both ends are scaled by 1000/T (improved-diffusion), which keeps the total
    noise sum(beta) about the same, so x_{T-1} is pure noise for every T. Unscaled, T = 200
    would leave sqrt(alpha_bar) = 0.36 of the digit at the last step. Below T = 20 the scaled
    end passes 1 (a step cannot add more than all the noise), so betas are capped at 0.999
    as in the cosine schedule."""
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(u) = cos^2(((u + s)/(1 + s)) pi/2).

    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t) = 1 - f((t+1)/T) / f(t/T), clipped at 0.999:
    f(1) = 0, so unclipped the last step has beta = 1 and alpha_bar = 0, and both 1/sqrt(alpha_t)
    in Ho's eq. 11 and 1/sqrt(alpha_bar) in x0_hat (predict_x0_eps) would divide by zero.
    The small offset s keeps beta_0 from being vanishingly small. Noise is added more
    slowly than with the linear schedule, which wastes fewer steps on pure noise at 28x28.
    """
    def f(u):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    t = torch.arange(T, dtype=torch.float64)
    return (1 - f((t + 1) / T) / f(t / T)).clamp(max=max_beta)


def make_schedule(name, T, device="cpu"):
    """All per-timestep constants the model uses, as float32 tensors of shape (T,)."""
    if name == "linear":
        betas = linear_betas(T)
    elif name == "cosine":
        betas = cosine_betas(T)
    else:
        raise ValueError(f"unknown schedule {name!r}: use 'linear' or 'cosine'")
    alphas = 1 - betas                                                # alpha_t = 1 - beta_t
    alpha_bar = torch.cumprod(alphas, dim=0)                          # alpha_bar_t = prod_{s<=t} alpha_s
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])  # alpha_bar_{t-1}, 1 at t=0
    # Posterior q(x_{t-1} | x_t, x0) = N(post_coef_x0 x0 + post_coef_xt x_t, beta_tilde_t) (Ho eq. 6-7):
    #   beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    #   post_coef_x0 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
    #   post_coef_xt = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    post_var = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    # beta_tilde_0 = 0 (at t = 0 the previous state x_{-1} is the digit x0 itself, known exactly);
    # its log would be -inf, so the bound uses beta_tilde_1 there (improved-diffusion's "log
    # variance clipped").
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    sched = {
        "betas": betas,
        "alpha_bar": alpha_bar,
        "sqrt_alpha_bar": alpha_bar.sqrt(),
        "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
        "post_var": post_var,
        "post_log_var": post_log_var,
        "post_coef_x0": alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
        "post_coef_xt": alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
    }
    return {k: v.to(device=device, dtype=torch.float32) for k, v in sched.items()}


def at(values, t, x):
    """values[t] shaped (B, 1, ..., 1) to broadcast against x: images (B, C, H, W), or any
    (B, ...) data such as latent_diffusion.py's latent vectors (B, L)."""
    return values[t].view(-1, *[1] * (x.dim() - 1))


# ---------------------------------------------------------------------------------------
# 2. Forward process and its posterior
# ---------------------------------------------------------------------------------------

def q_sample(sched, x0, t, noise):
    """x_t ~ q(x_t | x0) by reparameterisation (Ho eq. 4):  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
    return at(sched["sqrt_alpha_bar"], t, x0) * x0 + at(sched["sqrt_one_minus_alpha_bar"], t, x0) * noise


def q_posterior(sched, x0, x_t, t):
    """Mean, variance and log variance of q(x_{t-1} | x_t, x0) (Ho eq. 6-7).

    Tractable because, given x0, both q(x_{t-1}|x0) and q(x_t|x_{t-1}) are Gaussian:
    Bayes' rule multiplies them into another Gaussian."""
    mean = at(sched["post_coef_x0"], t, x0) * x0 + at(sched["post_coef_xt"], t, x0) * x_t
    return mean, at(sched["post_var"], t, x0), at(sched["post_log_var"], t, x0)


# ---------------------------------------------------------------------------------------
# 3. What the network predicts: eps, x0 or v
# ---------------------------------------------------------------------------------------
# Given x_t, any one of eps, x0, v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)
# determines the other two, so the network can be trained to output any of them. The
# sampler and the bound always work with (x0_hat, eps_hat). The default is v: near t = T an
# eps-network's x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab) divides its error by sqrt(ab),
# 0.006 at the last step of the linear schedule and 5e-5 of the cosine one, and a briefly
# trained one leaves many digits on a grey background; v is x0 there (docs/ddpm.md measures
# the difference).

def predict_x0_eps(sched, x_t, t, out, parameterization, clip=False):
    """Turn the network output into (x0_hat, eps_hat).

    eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)          (Ho eq. 4 solved for x0)
    x0:  eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)
    v:   x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(1 - ab) x_t + sqrt(ab) v
    clip: clamp x0_hat to the data range [-1, 1] and re-derive eps_hat from it, so the two
    stay consistent (improved-diffusion's DDIM sampler does this, gaussian_diffusion.py's
    ddim_sample; Ho et al.'s ancestral sampler clips x0_hat before the posterior mean, which
    needs no eps).
    """
    signal_scale, noise_scale = at(sched["sqrt_alpha_bar"], t, x_t), at(sched["sqrt_one_minus_alpha_bar"], t, x_t)
    if parameterization == "eps":
        eps = out
        x0 = (x_t - noise_scale * eps) / signal_scale
    elif parameterization == "x0":
        x0 = out
        eps = (x_t - signal_scale * x0) / noise_scale
    elif parameterization == "v":
        x0 = signal_scale * x_t - noise_scale * out
        eps = noise_scale * x_t + signal_scale * out
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}: use 'eps', 'x0' or 'v'")
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - signal_scale * x0) / noise_scale
    return x0, eps


def training_target_and_weight(sched, x0, noise, t, parameterization, min_snr_gamma=0.0):
    """The regression target for each parameterisation and the weight that makes its MSE
    equal to the eps-MSE of the simple loss (Ho eq. 14), with snr = ab / (1 - ab):

        ||eps - eps_hat||^2 = 1 * ||eps - eps_hat||^2 = snr ||x0 - x0_hat||^2 = snr/(snr + 1) ||v - v_hat||^2

    So --pred changes what the network outputs, not what is optimised. (The x0 weight is
    about 1e4 at t = 0: predicting x0 there is easy and its errors are magnified.)

    min_snr_gamma > 0: Min-SNR-gamma weighting (Hang et al. 2023, eq. 8), which caps the weight of
    the low-noise steps, where the eps-loss asks for pixel-exact detail and its gradients fight
    those of the noisy steps: each weight above times min(snr, gamma) / snr, i.e. an eps-loss
    weight min(snr, gamma) / snr, an x0 weight min(snr, gamma), a v weight min(snr, gamma) / (snr + 1).
    The loss is then no longer the eps-MSE of the bound."""
    ab = at(sched["alpha_bar"], t, x0)
    if parameterization == "eps":
        target, weight = noise, torch.ones_like(ab)
    elif parameterization == "x0":
        target, weight = x0, ab / (1 - ab)
    elif parameterization == "v":
        target, weight = ab.sqrt() * noise - (1 - ab).sqrt() * x0, ab  # snr / (snr + 1) = ab
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}: use 'eps', 'x0' or 'v'")
    if min_snr_gamma:
        snr = ab / (1 - ab)
        weight = weight * snr.clamp(max=min_snr_gamma) / snr
    return target, weight


# ---------------------------------------------------------------------------------------
# 4. Training loss
# ---------------------------------------------------------------------------------------

def diffusion_loss(model_fn, sched, x0, parameterization, generator=None, min_snr_gamma=0.0):
    """Per-image simple loss and the timesteps drawn.  (B,1,28,28) -> (B,), (B,); any (B, ...) data.

    Algorithm 1 of Ho et al.: t ~ Uniform{0..T-1}, eps ~ N(0, I), regress the target at
    x_t = q_sample(x0, t, eps). Returns the per-image loss so that the training loop can
    report it per quarter of the timestep range. min_snr_gamma: see training_target_and_weight."""
    T = sched["betas"].shape[0]
    t = torch.randint(0, T, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = q_sample(sched, x0, t, noise)
    target, weight = training_target_and_weight(sched, x0, noise, t, parameterization, min_snr_gamma)
    out = model_fn(x_t, t)
    return (weight * (out - target) ** 2).flatten(1).mean(1), t


# ---------------------------------------------------------------------------------------
# 5. Samplers
# ---------------------------------------------------------------------------------------
# Both take on_step, a function called with x after every step (sample.py draws trajectories
# with it); the loops themselves hold only the algorithm.

def p_mean(sched, x_t, t, out, parameterization, clip=True):
    """The mean of the learned reverse step p(x_{t-1} | x_t) = N(mu_theta(x_t, t), beta_tilde_t I)
    (Ho eq. 1, 11): the posterior mean with x0 replaced by the network's estimate,
        mu_theta(x_t, t) = coef1 x0_hat + coef2 x_t,
    which, written through eps_hat, is Ho eq. 11: (x_t - beta_t / sqrt(1 - ab_t) eps_hat) / sqrt(alpha_t).
    x0_hat is clipped to [-1, 1] (images; data without a range, such as latents: clip=False).
    The variance is not learned: it is fixed to the posterior's beta_tilde_t (sched["post_var"];
    Ho sec. 3.2: beta_t gives about the same samples)."""
    x0_hat, _ = predict_x0_eps(sched, x_t, t, out, parameterization, clip=clip)
    return q_posterior(sched, x0_hat, x_t, t)[0]


@torch.no_grad()
def ddpm_sample(model_fn, sched, shape, parameterization, generator=None, on_step=None, clip=True):
    """Ancestral sampling, Ho et al. Algorithm 2: x_{T-1} ~ N(0, I), then for t = T-1 .. 0
        x_{t-1} = mu_theta(x_t, t) + sigma_t z,  z ~ N(0, I)  (no noise at the last step),
    whose last step, t = 0, gives x_{-1}: the digit. Returns x in [-1, 1] (with clip)."""
    T, device = sched["betas"].shape[0], sched["betas"].device
    x = torch.randn(shape, device=device, generator=generator)
    for step in range(T - 1, -1, -1):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        mean = p_mean(sched, x, t, model_fn(x, t), parameterization, clip)
        x = mean if step == 0 else mean + at(sched["post_var"], t, x).sqrt() * torch.randn(shape, device=device, generator=generator)
        if on_step:
            on_step(x)
    return x


def ddim_timesteps(T, steps):
    """The 'trailing' grid of `steps` timesteps (Lin et al. 2024, table 2): starts at T-1,
    the only step whose input is pure noise, e.g. T = 1000, 50 steps: 999, 979, ..., 19.
    A grid that starts lower (0, 20, ..., 980) never starts from the noise it was trained on."""
    if not 1 <= steps <= T:
        raise ValueError(f"sample steps must be in [1, {T}], got {steps}")
    return [int(v) for v in np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1]


def ddim_sigma2(ab_t, ab_prev, eta):
    """Song et al. 2021, eq. 16: sigma^2 = eta^2 (1 - ab_prev)/(1 - ab_t) (1 - ab_t / ab_prev).
    eta = 0: deterministic DDIM; eta = 1 on the full grid: DDPM's posterior variance beta_tilde_t."""
    return eta ** 2 * (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)


@torch.no_grad()
def ddim_sample(model_fn, sched, shape, parameterization, steps=50, eta=1.0, generator=None, on_step=None, clip=True):
    """DDIM, Song et al. 2021 eq. 12, from t to the previous grid point s:

        x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z

    i.e. the predicted digit, re-noised to level s along the predicted noise direction, plus
    fresh noise of variance sigma^2 (ddim_sigma2). After the last grid point, ab = 1: x = x0_hat.
    clip: x0_hat clamped to [-1, 1] (images; False for data without a range, such as latents)."""
    T, device = sched["betas"].shape[0], sched["betas"].device
    grid = ddim_timesteps(T, steps)
    x = torch.randn(shape, device=device, generator=generator)
    for i, step in enumerate(grid):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        x0_hat, eps_hat = predict_x0_eps(sched, x, t, model_fn(x, t), parameterization, clip)
        ab_t = sched["alpha_bar"][step]
        ab_prev = sched["alpha_bar"][grid[i + 1]] if i + 1 < len(grid) else torch.ones_like(ab_t)
        sigma2 = ddim_sigma2(ab_t, ab_prev, eta)
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma2).clamp(min=0).sqrt() * eps_hat
        if eta > 0 and i + 1 < len(grid):
            x = x + sigma2.sqrt() * torch.randn(shape, device=device, generator=generator)
        if on_step:
            on_step(x)
    return x


def sample(model_fn, sched, n, parameterization, sampler="ddim", steps=None, eta=1.0, generator=None, on_step=None,
           shape=(1, 28, 28), clip=True):
    """Draw n samples of the given shape (MNIST digits in [-1, 1] unless told) with the chosen
    sampler. The defaults, DDIM with 50 steps (or T if fewer) and eta = 1, are the best digits
    per second we measured (docs/ddpm.md, "Which sampler"). clip: see p_mean (False for latent_diffusion.py's latents)."""
    shape = (n, *shape)
    if sampler == "ddpm":
        return ddpm_sample(model_fn, sched, shape, parameterization, generator, on_step, clip)
    steps = steps or min(50, sched["betas"].shape[0])
    return ddim_sample(model_fn, sched, shape, parameterization, steps, eta, generator, on_step, clip)


# ---------------------------------------------------------------------------------------
# 6. The variational bound in bits/dim
# ---------------------------------------------------------------------------------------
# -log p(x0) <= L = L_prior + sum_{t=1}^{T-1} L_t + L_0   (Ho eq. 5, 0-indexed)
#   L_prior = KL(q(x_{T-1} | x0) || N(0, I))                     no weights; ~0 if the schedule ends in noise
#   L_t     = E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))    t = 1 .. T-1; Gaussian vs Gaussian, closed form
#   L_0     = -E_q log p(x0 | x_0)                                 the last step, to the digit x_{-1} = x0: a
#                                                                  discretized Gaussian on the 256 pixel levels
# Each term is averaged over the 784 pixels and divided by ln 2: bits per dimension.
# Data are the 8-bit pixel values k/127.5 - 1, k = 0..255, so the decoder assigns each the
# probability of its bin [x - 1/255, x + 1/255] (edge bins open to +-infinity), and the bound
# is a real upper bound on the negative log-likelihood of the discrete digits.

def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


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


@torch.no_grad()
def vlb_bits_per_dim(model_fn, sched, x0, parameterization, generator=None):
    """The bound L for each image of x0 (B,1,H,W) in [-1, 1]: T network calls per image.

    Returns a dict of (B,) tensors: total, prior, kl (the sum of the L_t), decoder (L_0).
    It scores the T-step ancestral chain of ddpm_sample (x0_hat clipped to [-1, 1]; any choice
    of mean gives a valid bound), not the 50-step DDIM chain that draws the default samples (a
    bound of that chain would sum its own 50 KL terms; this file does not compute it)."""
    T = sched["betas"].shape[0]
    B = x0.shape[0]
    bits = 1.0 / math.log(2.0)

    def per_image(nats):  # nats per pixel -> bits/dim of each image
        return nats.mean(dim=(1, 2, 3)) * bits

    # L_prior: q(x_{T-1} | x0) = N(sqrt(ab) x0, 1 - ab) against N(0, 1).
    ab_last = sched["alpha_bar"][-1]
    prior = per_image(normal_kl(ab_last.sqrt() * x0, torch.log(1 - ab_last), torch.zeros_like(x0), torch.zeros_like(x0)))

    kl = torch.zeros(B, device=x0.device)
    decoder = torch.zeros(B, device=x0.device)
    for step in range(T - 1, -1, -1):
        t = torch.full((B,), step, device=x0.device, dtype=torch.long)
        x_t = q_sample(sched, x0, t, torch.randn(x0.shape, device=x0.device, generator=generator))
        mean = p_mean(sched, x_t, t, model_fn(x_t, t), parameterization)
        log_var = at(sched["post_log_var"], t, x0)  # the model's variance is the posterior's (clipped at t = 0)
        if step > 0:
            true_mean = q_posterior(sched, x0, x_t, t)[0]
            kl += per_image(normal_kl(true_mean, log_var, mean, log_var))
        else:
            decoder = per_image(-discretized_gaussian_log_likelihood(x0, mean, log_var))
    return {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder}


# ---------------------------------------------------------------------------------------
# 7. Exponential moving average of the weights
# ---------------------------------------------------------------------------------------
# Samples from an average of the recent weights are markedly cleaner than from the last
# weights (Ho et al. use decay 0.9999). A fixed 0.9999 averages over ~10,000 steps, which
# would leave a short run sampling from nearly-initial weights, so the decay warms up.

def ema_decay(k, max_decay):
    """Decay for the k-th update (k = 0, 1, ...): min(max_decay, 1 - (1 + k)^(-3/4)).
    0 at k = 0 (the average starts as a copy), 0.99 after ~450 steps, 0.999 after ~10^4."""
    return min(max_decay, 1.0 - (1.0 + k) ** -0.75)


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param, for all parameters at once (fused _foreach calls).
    decay may be a device tensor: it is never read on the host (a GPU records this update inside
    the training step). Parameters only: the schedule is not part of the network, and GroupNorm
    has no buffers."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, torch._foreach_mul(params, 1 - decay))


# ---------------------------------------------------------------------------------------
# 8. Training
# ---------------------------------------------------------------------------------------

def learning_rate(step, total_steps, args):
    """The learning rate of step `step` (0, 1, ...) of a run of total_steps: a linear warm-up over
    --warmup-steps to --lr (Goyal et al. 2017), then constant, or (--lr-schedule cosine) a half
    cosine from --lr down to 0 at the run's end (Loshchilov & Hutter 2017, without restarts):
        lr = peak * min(1, (step + 1) / W) * (1 + cos(pi * p)) / 2,   p = (step - W) / (total - W) in [0, 1].
    A schedule that ends at 0 makes the last weights an average over the last steps' small moves
    (what the EMA does for a constant rate), and so needs the run's length: see TimeBudget."""
    warm = args.warmup_steps
    factor = min(1.0, (step + 1) / warm)
    if args.lr_schedule == "cosine":
        progress = min(1.0, max(0, step - warm) / max(1, total_steps - warm))
        factor *= 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * factor


def make_train_step(model_fn, net, ema, opt, sched, args):
    """The training step: (uint8 digits, labels, EMA decay) -> (per-image loss, t).

    One step of Algorithm 1 (Ho et al.) and the EMA update. Every number it reads that changes
    from step to step is a tensor (the digits, the labels, the decay passed in, the learning
    rate held by the optimizer), so that a GPU can record the whole step once and replay it
    ("Speed on GPUs" below); on a CPU it simply runs."""
    params, ema_params = list(net.parameters()), list(ema.parameters())

    def train_step(images, labels, decay):
        x0 = to_model_range(images)
        fn = with_labels(model_fn, drop_labels(labels, args.p_uncond, net.null_label)) if args.class_cond else model_fn
        loss, t = diffusion_loss(fn, sched, x0, args.pred, min_snr_gamma=args.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        ema_update(ema_params, params, decay)
        return loss.detach(), t
    return train_step


def train(args):
    rank, world, device = init_distributed(setup(args))  # (0, 1, device) unless started by torchrun
    args.cuda_graph = cuda_graph_on(args.cuda_graph, device, world)
    ckpt = start_or_resume(args, "ddpm", MODEL_KEYS + RUN_KEYS)
    check_guidance(args)  # --resume: the checkpoint's conditioning is known only now
    torch.manual_seed(args.seed)
    train_x, train_y = load_mnist(args.data_dir, train=True, device=device)
    test = load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    if rank == 0:  # DDP: one writer
        make_out_dir(args.out_dir)
    budget = TimeBudget(args.minutes, ckpt, world, device)  # --minutes: the clock, and the run's planned length
    total_steps = budget.planned(total_steps)

    sched = make_schedule(args.schedule, args.timesteps, device)
    net = build_model(vars(args)).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    lr, decay = torch.tensor(args.lr, device=device), torch.tensor(0.0, device=device)  # set before each step
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **adam_options(device))
    step = restore(ckpt, device, model=net, ema=ema, optimizer=opt) if ckpt else 0
    opt.param_groups[0]["lr"] = lr  # (a restored optimizer brings its own copy)
    budget.start(step)
    if world > 1:
        seed_rank(args.seed, rank, step)
    train_fn = make_model_fn(data_parallel(net, world, device), device, args.amp, args.compile)
    train_step = replayable(make_train_step(train_fn, net, ema, opt, sched, args), device, args.cuda_graph, args.compile)
    ema_fn = make_model_fn(ema, device, args.amp)  # samplers eager: their compile costs more than it saves (performance.md)
    log(run_description(args, net, len(train_x), steps_per_epoch, total_steps, device, world))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    meter = Meter(step, total_steps, steps_per_epoch, args.batch_size, args.log_every, device)
    meter.note = log_extras(args, mfu_note(net, sched, args, device), budget.seconds_left)

    def save():
        if rank == 0:  # DDP: one writer
            save_checkpoint(ckpt_path, "ddpm", args, step, step // steps_per_epoch, device, model=net, ema=ema,
                            optimizer=opt, **budget.state())

    sample_speed, t_start = None, time.perf_counter()
    net.train()
    try:
        while step < total_steps:
            for images, labels in epoch_batches((train_x, train_y), step, steps_per_epoch, args.batch_size, args.seed):
                # this step's learning rate and EMA decay, as device tensors the step reads
                lr.fill_(learning_rate(step, total_steps, args))
                decay.fill_(ema_decay(step, args.ema_decay))
                # one step of Algorithm 1 and the EMA update (under torchrun: this rank's share of the batch)
                loss, t = train_step(images.tensor_split(world)[rank], labels.tensor_split(world)[rank], decay)
                step += 1
                # the log: the loss, and per quarter of the timestep range (t in [0, T/4), ...)
                meter.add("loss", loss)
                meter.add("by t quarter", loss, group=t * 4 // args.timesteps, groups=4)
                # the time budget (--minutes): the run's length planned after its first steps, revised halfway; when spent, the end
                total_steps = meter.total = budget.update(step)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # a grid every --sample-every epochs and at the end, then the checkpoint
                epoch, done = divmod(step, steps_per_epoch)
                if rank == 0 and ((done == 0 and epoch % args.sample_every == 0) or step >= total_steps):
                    name = f"samples_epoch_{epoch:03d}" if done == 0 else f"samples_step_{step:06d}"  # a mid-epoch stop
                    sample_speed = save_grid(ema_fn, sched, args, device, os.path.join(args.out_dir, name + ".png"),
                                             ema.null_label)
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)
    if rank == 0:
        finish(args, device, ema_fn, sched, test, meter, step, steps_per_epoch, time.perf_counter() - t_start,
               budget.seconds(), sample_speed, net)
    if world > 1:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------
# 9. Evaluation and main
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model_fn, sched, test_x, test_y, args, device):
    """Held-out metrics: the loss on the whole test split (cheap) and the bound in bits/dim on
    the first --eval-images test digits (T network calls each). With --class-cond both are of
    p(x | y) with the true labels, and the bound also of p(x): the same network with the label
    dropped. Since p(x) = sum_y p(y) p(x | y) >= p(y) p(x | y) with p(y) ~ 1/10,
    -log p(x | y) >= -log p(x) - log 10, i.e. at most log2(10) / 784 = 0.0042 bits/dim less."""
    batch = max(args.batch_size, 256)

    def fn(i, j):  # the model_fn for the test digits i .. j - 1
        return with_labels(model_fn, test_y[i:j]) if args.class_cond else model_fn

    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL)
    losses = [diffusion_loss(fn(i, i + batch), sched, to_model_range(test_x[i:i + batch]), args.pred, gen)[0]
              for i in range(0, len(test_x), batch)]
    metrics = {"test_loss": torch.cat(losses).mean().item()}
    n = min(args.eval_images, len(test_x))
    if n == 0:
        return metrics
    bounds = {"": fn, "_uncond": lambda i, j: model_fn} if args.class_cond else {"": fn}
    log(f"bound: {n} test images x {args.timesteps} timesteps x {len(bounds)} = {n * args.timesteps * len(bounds):,} "
        f"network calls (--eval-images sets how many)")
    for suffix, fn_at in bounds.items():
        t0, gen = time.perf_counter(), torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL)  # same noise
        parts = [vlb_bits_per_dim(fn_at(i, min(i + batch, n)), sched, to_model_range(test_x[i:min(i + batch, n)]),
                                  args.pred, gen) for i in range(0, n, batch)]
        for key in ("total", "prior", "kl", "decoder"):
            metrics[f"test_bpd{suffix}" + ("" if key == "total" else f"_{key}")] = torch.cat([p[key] for p in parts]).mean().item()
        what = " of -log p(x | y)" if suffix == "" and args.class_cond else " of -log p(x), label dropped" if suffix else ""
        log(f"bound{what}: {metrics[f'test_bpd{suffix}']:.4f} bits/dim (prior {metrics[f'test_bpd{suffix}_prior']:.5f}, "
            f"diffusion KLs {metrics[f'test_bpd{suffix}_kl']:.4f}, decoder {metrics[f'test_bpd{suffix}_decoder']:.4f}) "
            f"in {time.perf_counter() - t0:.1f}s")
    metrics["test_bpd_images"] = n
    return metrics


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        eval_only(args)
    else:
        train(args)


# =======================================================================================
# Extensions: what builds on the story
# =======================================================================================


# ---------------------------------------------------------------------------------------
# A. Conditioning on the label: classifier-free guidance
# ---------------------------------------------------------------------------------------
# With --class-cond the U-Net also takes the label y (an embedding added to the time
# embedding). During training each label is replaced by the "no label" index with
# probability p_uncond, so one network learns both p(x | y) and p(x) (Ho & Salimans 2022,
# Algorithm 1; they found p_uncond = 0.1 and 0.2 about equal, 0.5 worse). The loss, the
# samplers and the bound stay as they are: they call a model_fn(x_t, t) with the labels bound.
# The "no label" index is the network's (`net.null_label`, 10 after the digits 0..9 in both
# of unet.py's networks), passed in as null_label.


def drop_labels(y, p_uncond, null_label, generator=None):
    """Each label replaced by null_label with probability p_uncond (training only)."""
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def with_labels(model_fn, y):
    """model_fn(x_t, t, y) with the labels y bound: the (x_t, t) -> prediction of p(x | y)."""
    return lambda x_t, t: model_fn(x_t, t, y)


def guided(model_fn, y, w, null_label):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6), as a model_fn(x_t, t):

        eps~(x_t, t, y) = (1 + w) eps(x_t, t, y) - w eps(x_t, t, none)

    w = 0 is the conditional model, w = -1 the unconditional one, larger w trades diversity for
    samples the label's class is surer of. Other codebases write eps_u + s (eps_c - eps_u) with
    s = 1 + w: the same thing. Both predictions come from one call on the doubled batch [x; x]
    with labels [y; none], not two calls.

    The raw output is combined, whatever the network predicts: eps, x0 and v are each affine
    in the output with coefficients that depend on (x_t, t) only, and the weights 1 + w and
    -w sum to 1, so combining outputs and then converting equals converting and then
    combining. Guiding v or x0 is guiding eps (DDIM's x0 clipping comes after, on the result)."""
    none = torch.full_like(y, null_label)

    def model_fn_guided(x_t, t):
        cond, uncond = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, none])).chunk(2)
        return cond + w * (cond - uncond)
    return model_fn_guided


def for_labels(model_fn, y, w, null_label):
    """What the samplers call to draw digits of the classes y: guided, or conditional at w = 0."""
    return guided(model_fn, y, w, null_label) if w else with_labels(model_fn, y)


# ---------------------------------------------------------------------------------------
# B. Inpainting: fill in the missing part of a digit with any trained model
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def inpaint(model_fn, sched, x0, known, parameterization, resample=1, generator=None):
    """Fill in the unknown pixels of x0 (B,1,28,28) in [-1, 1], where known (same shape, 1 =
    known, 0 = to fill) says which, with any trained model, no retraining: ancestral
    sampling in which, after every reverse step, the known pixels are replaced by the forward
    process applied to the known image at that noise level (the replacement method; Lugmayr
    et al. 2022, eq. 8):

        x_{t-1} = known * q_sample(x0, t-1) + (1 - known) * [mu_theta(x_t, t) + sigma_t z]

    (at t = 0 the known pixels are x0 itself). The model only ever sees one step of the
    known part, so the fill can disagree with it; RePaint's resampling (Lugmayr et al.,
    Algorithm 1) repeats each step `resample` times, going back one step with the forward
    transition x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z in between, so the fill and the
    known pixels can harmonise. resample = 1 is the plain replacement method. T * resample
    network calls."""
    T, shape = sched["betas"].shape[0], x0.shape
    noise = lambda: torch.randn(shape, device=x0.device, generator=generator)  # noqa: E731
    x = noise()
    for step in range(T - 1, -1, -1):
        t = torch.full((shape[0],), step, device=x0.device, dtype=torch.long)
        for r in range(resample):
            mean = p_mean(sched, x, t, model_fn(x, t), parameterization)
            unknown = mean if step == 0 else mean + at(sched["post_var"], t, x).sqrt() * noise()
            known_part = x0 if step == 0 else q_sample(sched, x0, t - 1, noise())
            x_prev = known * known_part + (1 - known) * unknown
            if r + 1 < resample and step > 0:  # back to x_t, then the step again
                x = at(1 - sched["betas"], t, x).sqrt() * x_prev + at(sched["betas"], t, x).sqrt() * noise()
        x = x_prev
    return x


# ---------------------------------------------------------------------------------------
# C. Speed on GPUs: the training step as one recorded unit, and the MFU in the log
# ---------------------------------------------------------------------------------------
# On a GPU this small U-Net is host-bound: one eager training step launches thousands of small
# kernels, and the Python and driver time of each launch costs more than the kernel itself, so
# the GPU waits for the host most of the step (the profile: docs/performance.md). A CUDA graph
# records every kernel of one step, the optimizer and the EMA included, and replays them all
# with one call. What a replay needs: the same shapes every step (full batches: run_length),
# inputs copied into the tensors that were recorded, and no number that changes from step to
# step baked into the recording (the learning rate and the EMA decay are device tensors; the
# optimizer is "capturable").
#
# torch.compile is off by default, on GPUs too: a cold compile of this U-Net takes about a
# minute, more than all the eager kernels of a default run add up to, so no fusion can win it
# back there; --compile is for long runs (docs/performance.md has the figures).

def adam_options(device):
    """AdamW's fused kernel where it exists, capturable (state and learning rate on the device) on CUDA."""
    return {"fused": fused_adam_ok(device), "capturable": device.type == "cuda"}


def cuda_graph_on(asked, device, world=1):
    """--cuda-graph (asked: True, False or None for the default) settled: on by default on CUDA
    with one process; asked for elsewhere, one clear line."""
    if asked and (device.type != "cuda" or world > 1):
        fail("--cuda-graph records the step on one CUDA device" + (", not under torchrun" if world > 1 else ""))
    return device.type == "cuda" and world == 1 if asked is None else asked


def replayable(train_step, device, enabled, compiled=False, warmup=3):
    """train_step, on CUDA (if enabled: --cuda-graph) recorded as a CUDA graph after `warmup`
    eager steps and replayed from then on (PyTorch's CUDA semantics notes, "whole-network
    capture"). The warm-up steps are real training steps, on a side stream as the recording must
    be; they create what a recording cannot (optimizer state, cuDNN plans, compiled kernels). A
    failed recording says so in one line and the step runs eagerly. Elsewhere (or not enabled):
    train_step itself, with the time of its first call in the log if compiled."""
    if not enabled or device.type != "cuda":
        return first_call_logged(train_step) if compiled else train_step
    torch.backends.cudnn.benchmark = True  # the fastest convolution for these fixed shapes (measured: performance.md)
    torch._dynamo.config.suppress_errors = True  # a network that fails to compile runs eagerly
    # A recording cannot reuse bf16 copies of the weights that autocast cached outside it, so its
    # cache is off, from the first warm-up step on: torch.compile guards on that flag, and turning
    # it off only to record would recompile while recording. (It saved nothing: every model_fn call
    # is an autocast region of its own, and the cache lives for one region.)
    torch.set_autocast_cache_enabled(False)
    state = {"calls": 0, "graph": None}

    def run(*inputs):
        if state["graph"] is None and state["calls"] < warmup:
            state.setdefault("t0", time.perf_counter())  # the warm-up's start
            state["calls"] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = train_step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if state["graph"] is None:
            try:
                state["inputs"], state["graph"] = [x.clone() for x in inputs], torch.cuda.CUDAGraph()
                with torch.cuda.graph(state["graph"]):
                    state["outputs"] = train_step(*state["inputs"])
                log(f"{warmup} eager steps (torch.compile, if on) and the recording of the step as a CUDA graph: "
                    f"{time.perf_counter() - state['t0']:.1f}s")
            except Exception as e:  # never worse than today: the eager step
                state["graph"] = False
                log(f"could not record the training step as a CUDA graph ({type(e).__name__}: {str(e)[:120]}); "
                    f"training with the eager step")
        if state["graph"] is False:
            return train_step(*inputs)
        for static, x in zip(state["inputs"], inputs):
            static.copy_(x)
        state["graph"].replay()
        return state["outputs"]  # overwritten by the next replay: read (or queue a read) before it
    return run


def first_call_logged(train_step):
    """train_step, whose first call, where torch.compile traces and generates the forward and
    backward code, says in the log how long it took (up to its results on the host)."""
    done = False

    def run(*inputs):
        nonlocal done
        if done:
            return train_step(*inputs)
        t0, out = time.perf_counter(), train_step(*inputs)
        out[0].sum().item()  # waits for the device
        done = True
        log(f"first training step (torch.compile included): {time.perf_counter() - t0:.1f}s")
        return out
    return run


# MFU = (model FLOPs per training image) x (images/s) / (the device's peak FLOP/s), the
# fraction of the hardware's arithmetic that goes into the model (Chowdhery et al. 2022,
# appendix B; nanoGPT logs it). The FLOPs are counted once by torch's FlopCounterMode on one
# loss forward and backward; the optimizer and the EMA are O(parameters) and left out. Peaks
# are the data sheets' dense figures: bf16 under --amp, else TF32 (fp32 matmuls use it here).

PEAK_TFLOPS = {  # name as torch.cuda.get_device_name() has it: (bf16, tf32) dense TFLOP/s; first match wins
    "H100 PCIe": (756, 378), "H100 NVL": (835, 418), "H100": (989, 495), "H200": (989, 495), "GH200": (989, 495),
    "A100": (312, 156), "L40S": (362, 183), "L4": (121, 60), "RTX 4090": (165, 83), "RTX 3090": (71, 36),
}


def peak_flops(device, amp):
    """The device's peak FLOP/s for the network's precision, or None for a device not in the table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((1e12 * (bf16 if amp else tf32) for key, (bf16, tf32) in PEAK_TFLOPS.items() if key in name), None)


def training_flops_per_image(net, sched, args, device, batch=2):
    """FLOPs of one training image: the loss's forward and backward through the plain network
    (nothing in it depends on the batch size). Its own generator: the run's RNG is untouched."""
    from torch.utils.flop_counter import FlopCounterMode
    x0, gen = torch.zeros(batch, 1, 28, 28, device=device), torch.Generator(device=device).manual_seed(0)
    model_fn = with_labels(net, torch.zeros(batch, dtype=torch.long, device=device)) if args.class_cond else net
    with FlopCounterMode(display=False) as counter:
        diffusion_loss(model_fn, sched, x0, args.pred, gen)[0].mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def mfu_note(net, sched, args, device):
    """For the log line: images/s -> "MFU x%" on a GPU of the table, else None (no MFU shown)."""
    peak = peak_flops(device, args.amp)
    if peak is None:
        return None
    flops = training_flops_per_image(net, sched, args, device)
    return lambda images_per_sec: f"MFU {100 * flops * images_per_sec / peak:.1f}%"


# ---------------------------------------------------------------------------------------
# D. Several GPUs: torchrun
# ---------------------------------------------------------------------------------------
# `torchrun --standalone --nproc_per_node=N ddpm.py ...` starts N copies of this script, one
# per GPU, and sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT's pattern). Each takes its N-th
# of every global batch of --batch-size digits, draws its own noise and timesteps, and
# DistributedDataParallel averages the gradients in backward(), so every rank takes the same
# optimizer step and holds the same weights (and EMA). Rank 0 alone writes the log, grids,
# checkpoints and metrics. (The step is not recorded as a CUDA graph under DDP.)

def init_distributed(device):
    """(rank, world size, device). Under torchrun: one process group (nccl on CUDA, gloo on the
    CPU), rank r on GPU LOCAL_RANK, and ranks other than 0 print nothing. Else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        fail(f"torchrun runs on CUDA (nccl) or the CPU (gloo), not on {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all (errors still reach stderr)
    return dist.get_rank(), dist.get_world_size(), device


def data_parallel(net, world, device):
    """The network that trains: under DDP wrapped to average the gradients over the ranks in
    backward() (it also copies rank 0's initial weights to all); else the network itself."""
    if world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def seed_rank(seed, rank, step):
    """Each rank its own noise and timesteps (the same draws on every rank would waste the extra
    GPUs), from (seed, rank, step), so that a resumed run is reproducible as well."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def same_on_every_rank(n, world, device):
    """Rank 0's integer n on every rank (the planned length of a --minutes run: each rank's clock
    differs, and the ranks must stop at the same step)."""
    if world == 1:
        return n
    import torch.distributed as dist
    value = torch.tensor([n], device=device, dtype=torch.long)
    dist.broadcast(value, src=0)
    return int(value.item())


def any_rank(flag, world, device):
    """True on every rank if it is on any: the ranks must stop at the same step. A host sync,
    used only under DDP with --minutes (each rank's clock differs)."""
    if world == 1:
        return flag
    import torch.distributed as dist
    flags = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.item() > 0


# =======================================================================================
# Run plumbing of this script: checks, evaluation of a checkpoint, the end of a run, grids
# =======================================================================================

class TimeBudget:
    """--minutes: the run's clock and its length in steps. The clock is this process's since
    train() began (loading, grids and checkpoint writes count; the evaluation after training does
    not), plus what the earlier runs of a --resume chain spent. A schedule that ends at the run's
    end (--lr-schedule cosine) needs that end as a step, so after PLAN_AFTER steps the speed they
    took fixes it: the steps that fit the time left, less 5% for the grids and checkpoints still
    to come and the machine's own variation. Halfway from there to the planned end the plan is
    revised once from the speed of the steps since the plan, since the first steps can run faster or
    slower than the rest (on 2 CPU cores by 5-10%: a run that stops 7% short, or whose clock runs
    out before its learning rate reaches 0). The plan goes into the checkpoint: a --resume with the
    same --minutes keeps it and its revision (exact once revised); another --minutes plans anew.
    The clock still ends a run that falls behind."""
    PLAN_AFTER, SKIP = 50, 5  # steps timed (the first SKIP left out: warm-up, the CUDA graph's recording)
    clock = staticmethod(time.perf_counter)  # seconds; a test swaps in a clock of its own

    def __init__(self, minutes, ckpt, world, device):
        self.minutes, self.world, self.device = minutes, world, device
        ckpt = ckpt or {}
        self.before = ckpt.get("train_seconds", 0.0)
        same_plan = minutes and ckpt.get("planned_minutes") == minutes
        self.plan = ckpt.get("planned_steps") if same_plan else None
        self.revise_at = ckpt.get("revise_plan_at") if same_plan else None  # a step; None: no revision to come
        self.t0 = self.clock()

    def planned(self, total_steps):
        """The run's length: total_steps (of --epochs or --max-steps), or the plan if shorter."""
        self.limit = total_steps  # what a revised plan may extend up to
        return self.length()

    def length(self):
        return min(self.limit, self.plan) if self.plan else self.limit

    def start(self, step):
        self.first_step, self.timed_from = step, None  # (step, clock) where the speed's timing starts

    def seconds(self):
        return self.before + self.clock() - self.t0

    def seconds_left(self):
        return 60 * self.minutes - self.seconds()

    def steps_that_fit(self, step):
        """step + the steps that fit 95% of the time left at the speed since timed_from; the timing
        then starts again here."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps queued so far, done
        (from_step, from_time), now = self.timed_from, self.clock()
        per_step = (now - from_time) / (step - from_step)
        self.timed_from = step, now
        plan = same_on_every_rank(step + int(0.95 * self.seconds_left() / per_step), self.world, self.device)
        return plan, f"{1000 * per_step:.0f} ms a step"

    def update(self, step):
        """The run's total steps after `step` steps: planned, revised once, cut short if the time is spent."""
        if not self.minutes:
            return self.limit
        timed = step - self.first_step
        if timed == self.SKIP:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timed_from = step, self.clock()
        if self.plan is None and timed == self.PLAN_AFTER:
            self.plan, speed = self.steps_that_fit(step)
            self.revise_at = (step + self.plan) // 2  # the same step on every rank
            log(f"--minutes {self.minutes:g}: {speed}, so the run is planned as {self.length()} steps")
        elif step == self.revise_at and timed >= self.PLAN_AFTER:  # (a resumed process needs its own timing)
            self.plan, speed = self.steps_that_fit(step)
            log(f"--minutes {self.minutes:g}: {speed} since, so the plan is revised to {self.length()} steps")
        if self.revise_at is not None and step >= self.revise_at:
            self.revise_at = None
        planned = self.length()
        if any_rank(self.seconds_left() <= 0, self.world, self.device):
            if step < planned:
                log(f"--minutes {self.minutes:g} spent at step {step}, before the planned {planned}")
            return step
        return planned

    def state(self):
        """For the checkpoint: plain numbers."""
        return {"train_seconds": self.seconds(), "planned_steps": self.plan, "planned_minutes": self.minutes,
                "revise_plan_at": self.revise_at}


def check_backbone(args):
    """--arch and its own flags: a flag of the other backbone is an error, not ignored; the rest
    take BACKBONES' defaults."""
    for arch, flags in BACKBONES.items():
        given = [name for name in flags if getattr(args, name) is not None]
        if arch != args.arch and given:
            fail(f"--{given[0].replace('_', '-')} is a flag of --arch {arch}, not of --arch {args.arch}")
    for name, default in BACKBONES[args.arch].items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.arch == "unet":
        try:
            parse_channel_mult(args.channel_mult)
        except ValueError as e:
            fail(str(e))
    elif 28 % args.patch_size or args.width % args.heads or args.width % 4:
        fail(f"--arch dit: --patch-size must divide 28 and --width {args.width} must split into --heads {args.heads} "
             f"and into 4 (the 2-D position embedding); got --patch-size {args.patch_size}")


def check_args(args):
    """The checks no single argparse type can make."""
    check_backbone(args)
    for name in ("ema_decay", "dropout", "p_uncond"):
        if getattr(args, name) is not None and not 0.0 <= getattr(args, name) < 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    check_sampler(args)
    if args.guidance and not args.class_cond and not (args.eval_only or args.resume):  # those read it from the checkpoint
        fail("--guidance applies to a --class-cond model")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} (the global batch) does not split evenly over {world} processes")
    if args.score_samples:
        try:
            import score
        except ImportError:
            fail("--score-samples needs score.py, this project's sample scorer, beside this script")
        score.check_classifier(args.classifier, args.data_dir)


def check_sampler(args):
    """--sampler, --sample-steps and --eta together (latent_diffusion.py checks its own with this)."""
    if args.sampler == "ddpm" and (args.sample_steps is not None or args.eta is not None):
        fail("--sample-steps and --eta apply to --sampler ddim (ancestral sampling uses all T steps)")
    if args.sample_steps is not None and args.sample_steps > args.timesteps:
        fail(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}")
    args.eta = 1.0 if args.eta is None else args.eta
    if args.eta < 0:
        fail(f"--eta must be >= 0, got {args.eta}")


def check_guidance(args):
    """--guidance needs a class-conditional model; a resumed or evaluated one says which it is."""
    if args.guidance and not args.class_cond:
        fail(f"--guidance applies to a --class-cond model; {os.path.join(args.out_dir, 'ckpt.pt')} is unconditional")


def eval_only(args):
    """Evaluate the EMA weights of out-dir/ckpt.pt: held-out loss, bound in bits/dim, a grid."""
    device = setup(args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "ddpm")
    for key in MODEL_KEYS + ("seed",):
        setattr(args, key, ckpt["config"].get(key))  # (a checkpoint from before the DiT has no DiT keys)
    check_guidance(args)
    ema = build_model(ckpt["config"]).to(device).eval()
    ema.load_state_dict(ckpt["ema"])
    log(f"evaluating {ckpt_path} (step {ckpt['step']}, EMA weights)")
    ema_fn, sched = make_model_fn(ema, device, args.amp), make_schedule(args.schedule, args.timesteps, device)
    speed = save_grid(ema_fn, sched, args, device, os.path.join(args.out_dir, f"eval_samples_{args.sampler}.png"),
                      ema.null_label)
    test = load_mnist(args.data_dir, train=False, device=device)
    report(args, device, ema_fn, sched, test, "eval.json", ema.null_label, checkpoint=ckpt_path, step=ckpt["step"], sample_images_per_sec=speed)


def report(args, device, ema_fn, sched, test, name, null_label, **metrics):
    """Held-out metrics of the EMA weights on test (images, labels), and --score-samples, written
    to out-dir/name with the run's own figures (metrics)."""
    metrics.update(evaluate(ema_fn, sched, *test, args, device), device=describe(device))
    if args.score_samples:
        metrics["score"] = score_run(ema_fn, sched, args, device, null_label, metrics["sample_images_per_sec"])
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, name))
    return metrics


def finish(args, device, ema_fn, sched, test, meter, step, steps_per_epoch, wall, train_seconds, sample_speed, net):
    """The end of a run: metrics.json and a summary line."""
    images_per_sec = meter.images_per_sec(step * args.batch_size, wall)
    m = report(args, device, ema_fn, sched, test, "metrics.json", net.null_label, config=vars(args), step=step,
               epochs_done=step / steps_per_epoch, train_seconds=train_seconds, train_loss=meter.last.get("loss", math.nan),
               train_images_per_sec=images_per_sec, sample_images_per_sec=sample_speed, wall_time_s=wall,
               parameters=sum(p.numel() for p in net.parameters()))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {m['train_loss']:.4f} | test loss {m['test_loss']:.4f}"
        + (f" | test bound {m['test_bpd']:.3f} bits/dim" if "test_bpd" in m else "")
        + (f" (label dropped: {m['test_bpd_uncond']:.3f})" if "test_bpd_uncond" in m else "")
        + (f" | FD {m['score']['fd']:.2f} (N={args.score_samples})" if "fd" in m.get("score", {}) else "")
        + f" | {images_per_sec:,.0f} train img/s | peak memory {m['peak_memory_mb']:.0f} MB")


def run_description(args, net, n_train, steps_per_epoch, total_steps, device, world):
    """The first log line: the model, the data and the run length, the hardware."""
    shape = (f"DiT, patch {args.patch_size}, {args.depth} x {args.width}, {args.heads} heads" if args.arch == "dit"
             else f"U-Net, {args.block or args.arch} blocks")
    return (f"ddpm: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters ({shape}), {args.schedule} "
            f"schedule, T={args.timesteps}, pred={args.pred}"
            + (f", labels (dropped with p={args.p_uncond})" if args.class_cond else "")
            + f" | {n_train} train images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps"
            + f" | device {device.type}" + (f" x {world} processes ({args.batch_size // world} images each)" if world > 1 else "")
            + f", compile={args.compile}, amp={args.amp}, cuda_graph={args.cuda_graph}"
            + (f" | at the end: {args.score_samples} samples scored ({sampler_cost(args)})" if args.score_samples else ""))


def log_extras(args, mfu, seconds_left):
    """The log line's extra figures: the MFU on a GPU of the table, the time left of --minutes."""
    if mfu is None and not args.minutes:
        return None
    return lambda speed: " | ".join(([mfu(speed)] if mfu else [])
                                    + ([f"{max(0.0, seconds_left()) / 60:.1f} min left of --minutes"] if args.minutes else []))


def draw(model_fn, sched, n, args, generator, labels=None, null_label=None):
    """n digits in [0, 1] with the run's sampler; with labels (n classes), of those classes."""
    if labels is not None:
        model_fn = for_labels(model_fn, labels, args.guidance, null_label)
    x = sample(model_fn, sched, n, args.pred, args.sampler, args.sample_steps, args.eta, generator)
    return (x + 1) / 2


def save_grid(model_fn, sched, args, device, path, null_label=None):
    """Sample a grid with a fixed generator (the same noise every epoch, so grids compare),
    write it, and return the sampling speed in images/s. --class-cond: one row per class 0..9
    of num_samples // 10 samples each, guided with --guidance."""
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID)
    n, nrow, labels = args.num_samples, int(math.ceil(math.sqrt(args.num_samples))), None
    if args.class_cond:
        nrow = max(1, args.num_samples // 10)
        n, labels = 10 * nrow, torch.arange(10, device=device).repeat_interleave(nrow)
    t0 = time.perf_counter()
    x = draw(model_fn, sched, n, args, gen, labels, null_label).cpu()
    speed = n / (time.perf_counter() - t0)  # .cpu() waited for the device: the time is real
    save_image(x, path, nrow=nrow)
    log(f"wrote {path} ({args.sampler}, {n / speed:.1f}s)")
    return speed


def sampler_cost(args):
    """The sampler of the grids in words, with its network calls per sample."""
    guidance = f", guidance w = {args.guidance:g} (a doubled batch)" if args.class_cond and args.guidance else ""
    calls = (args.timesteps if args.sampler == "ddpm" else args.sample_steps or min(50, args.timesteps)) * (2 if guidance else 1)
    if args.sampler == "ddpm":
        return f"ancestral{guidance}, {calls} network calls per sample"
    return f"DDIM, eta {args.eta:g}{guidance}, {calls} network calls per sample"


def score_run(ema_fn, sched, args, device, null_label=None, sample_speed=None):
    """--score-samples N: N samples from the EMA weights with the grids' sampler, scored by score.py
    (--class-cond: the same number of each class, and the classifier's accuracy on them)."""
    import score
    cost = sampler_cost(args) + (f"; about {args.score_samples / sample_speed / 60:.1f} min at the grids' speed"
                                 if sample_speed else "")
    labels = torch.arange(args.score_samples) % 10 if args.class_cond else None
    return score.draw_and_score(lambda n, gen, y=None: draw(ema_fn, sched, n, args, gen, None if y is None else y.to(device), null_label),
                                args.score_samples, device, cost, args.classifier, args.data_dir, args.seed, labels)


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
