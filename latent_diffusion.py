"""
latent_diffusion.py: chapter 4, a diffusion model as the prior of a VAE.

The two models so far each fail somewhere. vae.py's prior N(0, I) covers regions of latent
space that its encoder never uses: decoded, they are the smudges in its sample grid.
ddpm.py draws excellent digits, but with tens to hundreds of U-Net calls on 784 pixels.
Together: keep a trained VAE frozen, learn the distribution of its latents with a diffusion
model, and let the VAE's decoder turn that model's samples into digits. This is the idea of
latent diffusion (Rombach et al. 2022) and of diffusion priors in VAEs (Vahdat et al. 2021,
LSGM; Wehenkel & Louppe 2021).

    the data    z = mu(x) + sigma(x) eps for the training digits x: draws from the aggregate
                posterior q(z) = E_x q(z | x), the latents the decoder learned to decode
    the prior   a DDPM on u = z / s (s: the latents' standard deviation) whose denoiser is a
                small residual MLP; the schedule, loss, samplers and EMA are ddpm.py's
    a sample    u from the DDPM (DDIM, 50 steps), z = s u, x = the decoder's mean at z

The bound. A VAE with any prior p(z) bounds the likelihood (Kingma & Welling eq. 3, the KL
written out as a cross-entropy minus an entropy):

    -log p(x) <= E_q[-log p(x | z)] - H[q(z | x)] + E_q[-log p(z)]

The diffusion model has no tractable -log p(z), but it has its own variational bound
L_diff(z) >= -log p(z) (Ho et al. eq. 5), and putting it in place of -log p(z) keeps the
inequality (Vahdat et al. 2021, eq. 5):

    -log p(x) <= E_q[-log p(x | z)] - H[q(z | x)] + E_q[L_diff(z)]

With p(z) = N(0, I) the last two terms are vae.py's KL(q(z | x) || N(0, I)), so both priors
are measured on one scale. The DDPM models u = z / s, and a density changes with its
variable: p_z(z) = p_u(z / s) / s^L for L latent dimensions, so L_diff(z) = L_diff(u) + L log s.

Run:
    python vae.py --data-dir ../shared/mnist --out-dir out/vae              # a trained VAE first
    python latent_diffusion.py --vae-ckpt out/vae/ckpt.pt --data-dir ../shared/mnist
    python latent_diffusion.py --eval-only --iw-samples 1000 --data-dir ../shared/mnist
    python sample.py --ckpt out/latent_diffusion/ckpt.pt

Writes to --out-dir (default out/latent_diffusion): ckpt.pt (denoiser, its EMA, optimizer,
the latent scale s, the VAE checkpoint's path and SHA-256), samples_epoch_NNN.png (decoded
samples of the diffusion prior), compare.png (N(0, I) | diffusion prior | reconstructions),
metrics.json (losses, both bounds, sampling speed).

Reading order: the knobs -> the denoiser -> the VAE and its latents -> the bound of the
latent DDPM -> the VAE's bound with either prior -> pictures -> train() -> evaluate() ->
main(), then the appendix of plumbing that every script shares.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm
import vae
from unet import timestep_embedding, zero_init


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--vae-ckpt", default=None,
                   help="the trained vae.py checkpoint whose latents to model (a new run needs it; "
                        "--resume and --eval-only read it from the checkpoint)")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/latent_diffusion", help="checkpoint, sample grids, metrics.json")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--batch-size", type=positive_int, default=256)
    g.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup-steps", type=positive_int, default=200, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the denoiser (default: on for CUDA)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the networks (default: on for CUDA)")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    g.add_argument("--sample-every", type=positive_int, default=20, help="epochs between sample grids")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    g.add_argument("--eval-images", type=nonneg_int, default=1000,
                   help="test digits for the bounds (T denoiser calls each for the diffusion prior; 0 skips them)")
    g.add_argument("--iw-samples", type=nonneg_int, default=0,
                   help="also the VAE's own IWAE bound with K samples per digit (N(0, I) prior); 0: off")

    g = p.add_argument_group("model: the denoiser")
    g.add_argument("--width", type=positive_int, default=256, help="hidden units of the residual MLP")
    g.add_argument("--depth", type=positive_int, default=4, help="residual blocks")
    g.add_argument("--dropout", type=float, default=0.0)

    g = p.add_argument_group("diffusion (ddpm.py's)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    g.add_argument("--timesteps", type=positive_int, default=1000, help="T")
    g.add_argument("--pred", choices=["eps", "x0", "v"], default="v", help="what the denoiser predicts (ddpm.py's default)")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="maximum EMA decay (warmed up from 0)")

    g = p.add_argument_group("sampling (ddpm.py's defaults)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="DDIM (few steps), or ancestral (all T)")
    g.add_argument("--sample-steps", type=positive_int, default=None, help="DDIM steps (default 50, or T if fewer)")
    g.add_argument("--eta", type=float, default=None, help="DDIM noise (default 1); 0: deterministic")
    g.add_argument("--num-samples", type=positive_int, default=64, help="images per sample grid")
    g.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end (also with --eval-only): draw N samples from the diffusion prior and score "
                        "them with score.py (FD, IS, precision/recall); 0: off")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt",
                   help="score.py's digit classifier, for --score-samples")
    return p


# ---------------------------------------------------------------------------------------
# 1. The denoiser: a time-conditioned residual MLP on latent vectors
# ---------------------------------------------------------------------------------------
# The latents are a few dozen numbers with no spatial structure, so the U-Net's convolutions
# have nothing to work on; an MLP with the same ingredients does: the sinusoidal timestep
# embedding of unet.py, pre-normalised residual blocks that add the time embedding, and a
# zero-initialised last layer in every residual branch (each block starts as the identity).

class ResidualBlock(nn.Module):
    """h + W2 dropout(SiLU(W1 LayerNorm(h) + W_t SiLU(emb)))."""

    def __init__(self, width, dropout):
        super().__init__()
        self.norm, self.fc1, self.time = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)
        self.dropout, self.fc2 = nn.Dropout(dropout), zero_init(nn.Linear(width, width))

    def forward(self, h, emb):
        return h + self.fc2(self.dropout(F.silu(self.fc1(self.norm(h)) + self.time(F.silu(emb)))))


class Denoiser(nn.Module):
    """(B, L) noisy latents u_t and (B,) timesteps -> (B, L): the eps, x0 or v prediction."""

    def __init__(self, latent_dim, width=256, depth=4, dropout=0.0):
        super().__init__()
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), zero_init(nn.Linear(width, latent_dim)))

    def forward(self, u, t):
        emb = self.time_mlp(timestep_embedding(t, self.width))
        h = self.inp(u)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


MODEL_KEYS = ("latent_dim", "width", "depth", "dropout", "schedule", "timesteps", "pred")


def build_model(config):
    """The denoiser described by a config dict (the argparse namespace, or a checkpoint's)."""
    return Denoiser(config["latent_dim"], config["width"], config["depth"], config["dropout"])


# ---------------------------------------------------------------------------------------
# 2. The frozen VAE and its latents
# ---------------------------------------------------------------------------------------

def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_vae(path, device, expected_sha256=None):
    """vae.py's network from its checkpoint, frozen, and the checkpoint's config. With
    expected_sha256 (a resumed or evaluated run), the file must be the one trained on."""
    ckpt = load_checkpoint(path, "vae")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        fail(f"the VAE checkpoint {path} changed since this model was trained on its latents: "
             f"train a new one on it (or restore the old file)")
    if ckpt["config"].get("conditional"):
        fail(f"{path} is a conditional VAE (vae.py --conditional): this chapter models the latents of an unconditional one")
    net = vae.build_model(ckpt["config"]).to(device).eval().requires_grad_(False)
    net.load_state_dict(ckpt["model"])
    return net, ckpt["config"]


@torch.no_grad()
def encode_all(vae_net, images_u8, vae_config, generator, batch=1000):
    """The parameters of q(z | x) for every digit, as the VAE saw its data (binarized or
    dequantized, here once, with a fixed generator): (N, 2L), the rows mu | log sigma^2."""
    parts = []
    for i in range(0, len(images_u8), batch):
        x = vae.to_model_data(images_u8[i:i + batch], vae_config["likelihood"], vae_config["binarize"], generator)
        parts.append(torch.cat(vae_net.encode(x), dim=1))
    return torch.cat(parts)


def draw_latents(posterior, generator=None):
    """z ~ q(z | x) = N(mu, e^logvar) for each row mu | logvar. Drawn afresh for every batch,
    so that the prior learns the aggregate posterior, its noise included, not only the means."""
    mu, logvar = posterior.chunk(2, dim=1)
    return vae.reparameterize(mu, logvar, torch.randn(mu.shape, device=mu.device, generator=generator))


def latent_scale(posterior, generator):
    """s: one number, the standard deviation of all coordinates of z ~ q(z | x) over the
    training digits (the rescaling of Rombach et al. 2022, who estimate it on a first batch).
    u = z / s then has unit variance, the data scale that ddpm.py's schedule was made for:
    after its T steps sqrt(alpha_bar) = 0.006 of u is left, not more."""
    return draw_latents(posterior, generator).std().item()


# ---------------------------------------------------------------------------------------
# 3. The bound of the latent DDPM: -log p(z) <= L_diff(z), in nats
# ---------------------------------------------------------------------------------------
# ddpm.vlb_bits_per_dim with two changes for continuous data: no discretisation in the last
# term (a Gaussian density instead of the probability of an 8-bit level) and no clipping of
# x0_hat (latents have no range). Nats per latent vector, summed over its L coordinates.

def gaussian_nll(x, mean, log_var):
    """-log N(x; mean, e^log_var), elementwise: 1/2 (log 2 pi + log_var + (x - mean)^2 e^-log_var)."""
    return 0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


@torch.no_grad()
def latent_bound(model_fn, sched, u0, parameterization, generator=None):
    """L_diff(u0) >= -log p(u0) for each vector of u0 (B, L) (Ho et al. eq. 5), t 0-based:

        L_prior = KL(q(u_{T-1} | u_0) || N(0, I))
        L_t     = KL(q(u_{t-1} | u_t, u_0) || N(mu_theta(u_t, t), beta_t I)),  t = T-1 .. 1, one u_t each
        L_0     = -log N(u_0; mu_theta(u_0', 0), beta_0 I)    (u_0' the first noisy version)

    Any reverse variance gives a valid bound. This one uses beta_t, not the sampler's
    beta_tilde_t: Ho et al. (sec. 3.2) find beta_t the right one for N(0, I) data, and the
    latents, scaled to unit variance, are close to that. It matters: for Gaussian data and the
    exact denoiser, beta_tilde_t leaves 0.58 nats per dimension between the bound and the true
    NLL, beta_t 0.0003 (tests/test_latent_diffusion.py computes both in closed form).
    T denoiser calls. Returns (B,) nats."""
    T, B = sched["betas"].shape[0], u0.shape[0]
    ab_last = sched["alpha_bar"][-1]
    zeros = torch.zeros_like(u0)
    total = ddpm.normal_kl(ab_last.sqrt() * u0, torch.log(1 - ab_last), zeros, zeros).sum(1)
    for step in range(T - 1, -1, -1):
        t = torch.full((B,), step, device=u0.device, dtype=torch.long)
        u_t = ddpm.q_sample(sched, u0, t, torch.randn(u0.shape, device=u0.device, generator=generator))
        mean = ddpm.p_mean(sched, u_t, t, model_fn(u_t, t), parameterization, clip=False)
        log_var = ddpm.at(sched["betas"], t, u0).log()
        if step > 0:
            true_mean, _, true_log_var = ddpm.q_posterior(sched, u0, u_t, t)
            total += ddpm.normal_kl(true_mean, true_log_var, mean, log_var).sum(1)
        else:
            total += gaussian_nll(u0, mean, log_var).sum(1)
    return total


def prior_bound(model_fn, sched, z, scale, parameterization, generator=None):
    """L_diff(z) of the unscaled latents: the DDPM models u = z / s, p_z(z) = p_u(z / s) / s^L,
    so -log p_z(z) = -log p_u(z / s) + L log s, and so for their bounds."""
    return latent_bound(model_fn, sched, z / scale, parameterization, generator) + z.shape[1] * math.log(scale)


def standard_normal_nll(z):
    """-log N(z; 0, I) per vector: vae.py's prior."""
    return gaussian_nll(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)


# ---------------------------------------------------------------------------------------
# 4. The VAE's bound with either prior
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def vae_bound(vae_net, x, eps, *prior_nlls):
    """One-sample estimate per digit of  E_q[-log p(x|z)] - H[q(z|x)] + E_q[-log p(z)]  in
    nats, z = mu + sigma eps: returns (B,) reconstruction and, for each prior given, its (B,)
    prior term (the last two). The priors share z, and the encoder and decoder run once.

    H[q(z | x)] = sum_j 1/2 (log(2 pi e) + log sigma_j^2), the entropy of a diagonal Gaussian,
    exact. A prior_nll(z) is -log p(z) or an upper bound on it: standard_normal_nll gives
    vae.py's negative ELBO (in expectation; vae.py computes the KL in closed form), a
    diffusion prior_bound the bound of this chapter."""
    mu, logvar = vae_net.encode(x)
    z = vae.reparameterize(mu, logvar, eps)
    recon = -vae_net.log_likelihood(x, vae_net.decode(z))
    entropy = 0.5 * (math.log(2 * math.pi * math.e) + logvar).sum(1)
    return (recon, *(prior_nll(z) - entropy for prior_nll in prior_nlls))


# ---------------------------------------------------------------------------------------
# 5. Samples and pictures
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def draw_digits(model_fn, sched, vae_net, scale, n, args, generator):
    """n digits from the diffusion prior: u from the latent DDPM (the sampler of --sampler),
    z = s u, decoded to the decoder's mean in [0, 1]. (n, 1, 28, 28)."""
    u = ddpm.sample(model_fn, sched, n, args.pred, args.sampler, args.sample_steps, args.eta, generator,
                    shape=(vae_net.latent_dim,), clip=False)
    return vae_net.mean(vae_net.decode(u * scale))


def save_grid(model_fn, sched, vae_net, scale, args, device, path):
    """--num-samples digits from the same noise every call; returns samples/s (the DDPM's
    steps and one decoder pass)."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    x = draw_digits(model_fn, sched, vae_net, scale, args.num_samples, args, gen).cpu()
    speed = args.num_samples / (time.perf_counter() - t0)
    save_image(x, path, nrow=int(math.ceil(math.sqrt(args.num_samples))))
    return speed


@torch.no_grad()
def save_comparison(model_fn, sched, vae_net, scale, test_data, args, device, path, per_block=8):
    """Three blocks of per_block x per_block digits, side by side: the decoder's mean at z ~
    N(0, I) (vae.py's samples), at z from the diffusion prior, and at the posterior mean of
    test digits (reconstructions: the best this decoder can draw)."""
    n, gen = per_block * per_block, torch.Generator(device=device).manual_seed(args.seed + 1)
    plain = vae_net.mean(vae_net.decode(torch.randn((n, vae_net.latent_dim), device=device, generator=gen)))
    prior = draw_digits(model_fn, sched, vae_net, scale, n, args, gen)
    recon = vae_net.mean(vae_net.decode(vae_net.encode(test_data[:n])[0]))
    blank = torch.ones((per_block, 1, 1, 28, 28), device=device)
    rows = [b.view(per_block, per_block, 1, 28, 28) for b in (plain, prior, recon)]
    grid = torch.cat([rows[0], blank, rows[1], blank, rows[2]], dim=1)  # (rows, 3 blocks + 2 gaps, ...)
    save_image(grid.reshape(-1, 1, 28, 28).cpu(), path, nrow=3 * per_block + 2)


# ---------------------------------------------------------------------------------------
# 6. Training
# ---------------------------------------------------------------------------------------

def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "latent_diffusion", MODEL_KEYS + ("seed", "batch_size", "lr", "warmup_steps",
                                                                   "grad_clip", "ema_decay", "vae_ckpt"))
    vae_net, vae_config = load_vae(args.vae_ckpt, device, ckpt["vae_sha256"] if ckpt else None)
    args.latent_dim = vae_net.latent_dim
    torch.manual_seed(args.seed)
    train_x, _ = load_mnist(args.data_dir, train=True, device=device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 4)
    posterior = encode_all(vae_net, train_x, vae_config, gen)  # (N, 2L), the same in a resumed run
    scale = ckpt["latent_scale"] if ckpt else latent_scale(posterior, gen)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)

    sched = ddpm.make_schedule(args.schedule, args.timesteps, device)
    net = build_model(vars(args)).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, fused=fused_adam_ok(device))
    step = restore(ckpt, device, model=net, ema=ema, optimizer=opt) if ckpt else 0
    params, ema_params = list(net.parameters()), list(ema.parameters())
    train_fn = make_model_fn(net, device, args.amp, args.compile)
    ema_fn = make_model_fn(ema, device, args.amp, args.compile)
    vae_sha256 = ckpt["vae_sha256"] if ckpt else file_sha256(args.vae_ckpt)
    log(f"latent_diffusion: {sum(p.numel() for p in params) / 1e6:.2f}M parameters (residual MLP {args.depth} x "
        f"{args.width}) on the {args.latent_dim}-d latents of {args.vae_ckpt} ({vae_config['arch']}, "
        f"{vae_config['likelihood']}), scale s = {scale:.4f} | {args.schedule} schedule, T={args.timesteps}, "
        f"pred={args.pred} | {len(train_x)} train digits, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps | device {device.type}")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def save():
        save_checkpoint(ckpt_path, "latent_diffusion", args, step, step // steps_per_epoch, device, model=net, ema=ema,
                        optimizer=opt, latent_scale=scale, vae_sha256=vae_sha256)

    meter, t_start = Meter(step, total_steps, steps_per_epoch, args, device), time.perf_counter()
    net.train()
    try:
        while step < total_steps:
            for batch in epoch_batches(posterior, step, steps_per_epoch, args):
                for group in opt.param_groups:  # linear warm-up of the learning rate
                    group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
                loss, t = ddpm.diffusion_loss(train_fn, sched, draw_latents(batch) / scale, args.pred)
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
                ddpm.ema_update(ema_params, params, ddpm.ema_decay(step, args.ema_decay))
                step += 1
                meter.add("loss", loss)
                meter.add("by t quarter", loss, group=t * 4 // args.timesteps, groups=4)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():
                if (step % steps_per_epoch == 0 and step // steps_per_epoch % args.sample_every == 0) or step >= total_steps:
                    name = (f"samples_epoch_{step // steps_per_epoch:03d}" if step % steps_per_epoch == 0
                            else f"samples_step_{step:06d}")
                    path = os.path.join(args.out_dir, name + ".png")
                    speed = save_grid(ema_fn, sched, vae_net, scale, args, device, path)
                    log(f"wrote {path} ({speed:,.0f} samples/s)")
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)

    finish(args, device, ema_fn, sched, vae_net, vae_config, scale, test_x, meter, step, steps_per_epoch,
           time.perf_counter() - t_start, sum(p.numel() for p in params))


def finish(args, device, ema_fn, sched, vae_net, vae_config, scale, test_x, meter, step, steps_per_epoch, wall, n_params):
    """The end of a run: held-out bounds and pictures of the EMA denoiser, metrics.json, a summary line."""
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch, "latent_scale": scale,
               "train_loss": meter.last.get("loss", math.nan),
               "train_latents_per_sec": meter.images_per_sec(step * args.batch_size, wall),
               "wall_time_s": wall, "device": describe(device), "parameters": n_params}
    metrics.update(evaluate(ema_fn, sched, vae_net, vae_config, scale, test_x, args, device))
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {metrics['train_loss']:.4f} | {summary(metrics)}")


# ---------------------------------------------------------------------------------------
# 7. Evaluation and main
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(ema_fn, sched, vae_net, vae_config, scale, test_x, args, device):
    """On the first --eval-images test digits (binarized / dequantized once, as vae.py does):
    the VAE's bound with its N(0, I) prior and with the diffusion prior, the same z for both;
    the VAE's own negative ELBO (closed-form KL) and, with --iw-samples, its IWAE bound; the
    comparison picture, the sampling speed and, with --score-samples, the FD of the samples."""
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)
    test_data = vae.to_model_data(test_x, vae_config["likelihood"], vae_config["binarize"], generator=gen)
    path = os.path.join(args.out_dir, "compare.png")
    save_comparison(ema_fn, sched, vae_net, scale, test_data, args, device, path)
    log(f"wrote {path}: decoded N(0, I) draws | decoded diffusion-prior draws | reconstructions of test digits")
    m = {"bound_units": "nats per digit" if vae_config["likelihood"] == "bernoulli" else "bits/dim (dequantized)"}
    n = min(args.eval_images, len(test_data))
    if n:
        log(f"bounds: {n} test digits, the diffusion prior with {args.timesteps} denoiser calls per digit "
            f"(--eval-images sets how many)")
        t0, batch, parts = time.perf_counter(), 500, {"recon": [], "standard": [], "diffusion": [], "elbo": []}
        for i in range(0, n, batch):
            x = test_data[i:min(i + batch, n)]
            eps = torch.randn((len(x), vae_net.latent_dim), device=device, generator=gen)
            recon, standard, diffusion = vae_bound(vae_net, x, eps, standard_normal_nll,
                                                   lambda z: prior_bound(ema_fn, sched, z, scale, args.pred, gen))
            r, kl = vae.elbo_terms(vae_net, vae_net, x, eps)
            for key, value in (("recon", recon), ("standard", recon + standard), ("diffusion", recon + diffusion),
                               ("elbo", r + kl)):
                parts[key].append(value)
        nats = {key: torch.cat(v).mean().item() for key, v in parts.items()}
        m.update({"test_images": n, "test_recon_nats": nats["recon"], "test_bound_standard_nats": nats["standard"],
                  "test_bound_diffusion_nats": nats["diffusion"], "test_neg_elbo_nats": nats["elbo"],
                  "bound_seconds": time.perf_counter() - t0})
        if args.iw_samples:
            log(f"IWAE of the VAE: {n} test digits x K = {args.iw_samples} decoder calls")
            bounds = [vae.iwae_bound(vae_net.encode, lambda x_, z: vae_net.log_likelihood(x_, vae_net.decode(z)),
                                     test_data[i:min(i + 16, n)], args.iw_samples, generator=gen)
                      for i in range(0, n, 16)]
            m.update({"test_iwae_nats": -torch.cat(bounds).mean().item(), "test_iwae_k": args.iw_samples})
        if vae_config["likelihood"] == "gaussian":  # nats of a density on [0, 1]^784 -> 8-bit bits/dim (vae.py sec. 5)
            for key in [k for k in m if k.endswith("_nats")]:
                m[key.replace("_nats", "_bpd")] = vae.bits_per_dim_dequantized(m[key])
    t0 = time.perf_counter()
    draw_digits(ema_fn, sched, vae_net, scale, 1000, args, gen)
    m["samples_per_sec"] = 1000 / (time.perf_counter() - t0)
    if args.score_samples:
        m["score"] = draw_and_score(args, lambda k, g: draw_digits(ema_fn, sched, vae_net, scale, k, args, g), device,
                                    sampler_cost(args))
    return m


def sampler_cost(args):
    steps = args.timesteps if args.sampler == "ddpm" else args.sample_steps or min(50, args.timesteps)
    return f"{args.sampler}{f', eta {args.eta:g}' if args.sampler == 'ddim' else ''}: {steps} denoiser calls and one decoder pass"


def summary(m):
    """One line of the held-out numbers."""
    s = ""
    if "test_images" in m:
        bpd = "test_bound_standard_bpd" in m
        unit, get = ("bits/dim", lambda k: m[f"test_{k}_bpd"]) if bpd else ("nats", lambda k: m[f"test_{k}_nats"])
        s = (f"bound with N(0, I) {get('bound_standard'):.3f} {unit}, with the diffusion prior "
             f"{get('bound_diffusion'):.3f} (the VAE's own -ELBO {get('neg_elbo'):.3f}"
             + (f", IWAE K={m['test_iwae_k']} {get('iwae'):.3f}" if "test_iwae_k" in m else "")
             + f"; {m['test_images']} test digits) | ")
    s += f"{m['samples_per_sec']:,.0f} samples/s"
    if "fd" in m.get("score", {}):
        s += f" | FD {m['score']['fd']:.2f} ({m['score']['n']} samples)"
    return s


def load_trained(args, device):
    """out-dir/ckpt.pt's EMA denoiser, its VAE (checked unchanged), scale and schedule."""
    ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "latent_diffusion")
    for key in MODEL_KEYS + ("seed", "vae_ckpt"):
        setattr(args, key, ckpt["config"][key])
    vae_net, vae_config = load_vae(args.vae_ckpt, device, ckpt["vae_sha256"])
    ema = build_model(ckpt["config"]).to(device).eval()
    ema.load_state_dict(ckpt["ema"])
    return ckpt, ema, vae_net, vae_config


def eval_only(args):
    """Evaluate out-dir/ckpt.pt: both bounds, the comparison picture, the sampling speed."""
    device = setup(args)
    ckpt, ema, vae_net, vae_config = load_trained(args, device)
    sched = ddpm.make_schedule(args.schedule, args.timesteps, device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {os.path.join(args.out_dir, 'ckpt.pt')} (step {ckpt['step']}, EMA weights)")
    metrics = {"step": ckpt["step"], "device": describe(device)}
    metrics.update(evaluate(make_model_fn(ema, device, args.amp, args.compile), sched, vae_net, vae_config,
                            ckpt["latent_scale"], test_x, args, device))
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
    """The checks no single argparse type can make."""
    if args.vae_ckpt is None and not (args.resume or args.eval_only):
        fail("a new run needs --vae-ckpt, a checkpoint of vae.py (e.g. out/vae/ckpt.pt)")
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.sampler == "ddpm" and (args.sample_steps is not None or args.eta is not None):
        fail("--sample-steps and --eta apply to --sampler ddim (ancestral sampling uses all T steps)")
    if args.sample_steps is not None and args.sample_steps > args.timesteps:
        fail(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}")
    args.eta = 1.0 if args.eta is None else args.eta
    if args.eta < 0:
        fail(f"--eta must be >= 0, got {args.eta}")
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
