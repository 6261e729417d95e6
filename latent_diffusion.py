"""
latent_diffusion.py: chapter 4, a diffusion model as the prior of a VAE.

The two models so far each fail somewhere. vae.py's prior N(0, I) covers regions of latent space
that its encoder never uses: decoded, they are the smudges in its sample grid. ddpm.py draws
excellent digits, but with tens to hundreds of U-Net calls on 784 pixels. Together: keep a
trained VAE frozen, learn the distribution of its latents with a diffusion model, and let the
VAE's decoder turn that model's samples into digits: latent diffusion (Rombach et al. 2022),
diffusion priors in VAEs (Vahdat et al. 2021, LSGM; Wehenkel & Louppe 2021). By default:

    the data    z = mu(x) + sigma(x) eps for the training digits x, afresh for every batch: draws
                from the aggregate posterior q(z) = E_x q(z | x), the latents the decoder decodes
    the prior   a DDPM on u = z / s (s: the latents' standard deviation) with ddpm.py's math: the
                linear schedule (T = 1000), a denoiser (a residual MLP, 4 blocks of 256) that
                predicts v with the weight that makes its loss Ho's eps loss (eq. 14), an EMA
    a sample    u from the EMA's DDPM (DDIM, 50 steps, eta = 1, no clipping: latents have no
                range), z = s u, x = the decoder's mean at z

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

Writes to --out-dir (default out/latent_diffusion): ckpt.pt (with s and the VAE file's SHA-256),
samples_epoch_NNN.png, compare.png (N(0, I) | diffusion prior | reconstructions), metrics.json.

Reading order: the knobs -> the denoiser -> the VAE and its latents -> the bound of the latent
DDPM -> the VAE's bound with either prior -> train() -> evaluate() -> main() -> this script's run
plumbing. The plumbing every script shares is ddpm.py's appendix, imported, not copied.
"""
import argparse
import copy
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddpm
import vae
from ddpm import (CKPT_VERSION, SEED_GRID, Meter, describe, epoch_batches, fail, fused_adam_ok,  # noqa: F401
                  load_checkpoint, load_mnist, log, make_model_fn, make_out_dir, nonneg_int, peak_memory_mb, positive_float,
                  positive_int, restore, run_length, save_checkpoint, save_image, setup, start_or_resume,
                  write_json)  # the appendix of ddpm.py (CKPT_VERSION: the format of this script's checkpoints too)
from unet import timestep_embedding, zero_init


def make_parser():
    """The knobs: every default of a run, on one screen. `python latent_diffusion.py --help` lists them."""
    p = argparse.ArgumentParser(description="Train or evaluate a diffusion prior in a trained VAE's latent space.",
                                formatter_class=ddpm.HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--vae-ckpt", default=None, help="the trained vae.py checkpoint whose latents to model "
                   "(a new run needs it; --resume and --eval-only read it from the checkpoint)")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/latent_diffusion", help="checkpoint, sample grids, metrics.json")
    g.add_argument("--epochs", type=positive_int, default=100, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=256, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup-steps", type=positive_int, default=200, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training network: for long runs (a cold compile costs about a minute)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA only)")
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
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the residual blocks")
    g = p.add_argument_group("diffusion (ddpm.py's math)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="noise schedule (linear here; ddpm.py's digits default to cosine)")
    g.add_argument("--timesteps", type=positive_int, default=1000, help="T")
    g.add_argument("--pred", choices=["eps", "x0", "v"], default="v", help="what the denoiser predicts")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="maximum EMA decay (warmed up from 0)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="DDIM (few steps), or ancestral (all T)")
    g.add_argument("--sample-steps", type=positive_int, default=None, help="DDIM steps (default 50, or T if fewer)")
    g.add_argument("--eta", type=float, default=None, help="DDIM noise (default 1); 0: deterministic")
    g.add_argument("--num-samples", type=positive_int, default=64, help="images per sample grid")
    g.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end (also with --eval-only): score N samples with score.py (FD, IS, precision/recall); 0: off")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt", help="score.py's digit classifier")
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


# The flags of a trained model (a resumed or evaluated run takes them from its checkpoint), and of its run.
MODEL_KEYS = ("latent_dim", "width", "depth", "dropout", "schedule", "timesteps", "pred")
RUN_KEYS = ("seed", "batch_size", "lr", "warmup_steps", "grad_clip", "ema_decay", "vae_ckpt")


def build_model(config):
    """The denoiser described by a config dict (the argparse namespace, or a checkpoint's)."""
    return Denoiser(config["latent_dim"], config["width"], config["depth"], config["dropout"])


# ---------------------------------------------------------------------------------------
# 2. The frozen VAE, its latents, and digits from latents
# ---------------------------------------------------------------------------------------

SEED_LATENTS = 4  # the generator seeded args.seed + this binarizes the training digits once and measures s


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
    if ckpt["config"]["class_cond"]:
        fail(f"{path} is a conditional VAE (vae.py --class-cond): this chapter models the latents of an unconditional one")
    net = vae.build_model(ckpt["config"]).to(device).eval().requires_grad_(False)
    net.load_state_dict(ckpt["model"])
    return net, ckpt["config"]


@torch.no_grad()
def encode_all(vae_net, images_u8, vae_config, generator, batch=1000):
    """The parameters of q(z | x) for every digit, as the VAE saw its data (binarized or
    dequantized, here once, with a fixed generator): (N, 2L), the rows mu | log_var."""
    parts = []
    for i in range(0, len(images_u8), batch):
        x = vae.likelihood_data(images_u8[i:i + batch], vae_config["likelihood"], vae_config["binarize"], generator)
        parts.append(torch.cat(vae_net.encode(x), dim=1))
    return torch.cat(parts)


def draw_latents(posterior, generator=None):
    """z ~ q(z | x) = N(mu, e^log_var) for each row mu | log_var. Drawn afresh for every batch,
    so that the prior learns the aggregate posterior, its noise included, not only the means."""
    mu, log_var = posterior.chunk(2, dim=1)
    return vae.reparameterize(mu, log_var, torch.randn(mu.shape, device=mu.device, generator=generator))


def latent_scale(posterior, generator):
    """s: one number, the standard deviation of all coordinates of z ~ q(z | x) over the
    training digits (the rescaling of Rombach et al. 2022, who estimate it on a first batch).
    u = z / s then has unit variance, the data scale that ddpm.py's schedule was made for:
    after its T steps sqrt(alpha_bar) = 0.006 of u is left, not more."""
    return draw_latents(posterior, generator).std().item()


@torch.no_grad()
def draw_digits(model_fn, sched, vae_net, scale, n, how, generator):
    """n digits from the diffusion prior: u from the latent DDPM (how: pred, sampler,
    sample_steps, eta, e.g. the args), z = s u, decoded to the decoder's mean in [0, 1]. (n, 1, 28, 28)."""
    u = ddpm.sample(model_fn, sched, n, how.pred, how.sampler, how.sample_steps, how.eta, generator,
                    shape=(vae_net.latent_dim,), clip=False)
    return vae_net.mean(vae_net.decode(u * scale))


# ---------------------------------------------------------------------------------------
# 3. The bound of the latent DDPM: -log p(z) <= L_diff(z), in nats
# ---------------------------------------------------------------------------------------
# ddpm.vlb_bits_per_dim with two changes for continuous data: no discretisation in the last
# term (a Gaussian density instead of the probability of an 8-bit level) and no clipping of
# x0_hat (latents have no range). Nats per latent vector, summed over its L coordinates.

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
    NLL, beta_t 0.0003 (tests/test_latent_diffusion.py computes both in closed form). T denoiser calls; (B,) nats."""
    T, B, ab_last, zeros = sched["betas"].shape[0], u0.shape[0], sched["alpha_bar"][-1], torch.zeros_like(u0)
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
            total -= vae.log_normal_diag(u0, mean, log_var)
    return total


def prior_bound(model_fn, sched, z, scale, parameterization, generator=None):
    """L_diff(z) of the unscaled latents: the DDPM models u = z / s, p_z(z) = p_u(z / s) / s^L,
    so -log p_z(z) = -log p_u(z / s) + L log s, and so for their bounds."""
    return latent_bound(model_fn, sched, z / scale, parameterization, generator) + z.shape[1] * math.log(scale)


def standard_normal_nll(z):
    """-log N(z; 0, I) per vector: vae.py's prior."""
    return -vae.log_normal_diag(z, torch.zeros_like(z), torch.zeros_like(z))


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
    mu, log_var = vae_net.encode(x)
    z = vae.reparameterize(mu, log_var, eps)
    recon = -vae_net.log_likelihood(x, vae_net.decode(z))
    entropy = 0.5 * (math.log(2 * math.pi * math.e) + log_var).sum(1)
    return (recon, *(prior_nll(z) - entropy for prior_nll in prior_nlls))


# ---------------------------------------------------------------------------------------
# 5. Training: ddpm.py's Algorithm 1 on the latents, with the VAE frozen
# ---------------------------------------------------------------------------------------

def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "latent_diffusion", MODEL_KEYS + RUN_KEYS)
    vae_net, vae_config = load_vae(args.vae_ckpt, device, ckpt["vae_sha256"] if ckpt else None)
    vae_sha256 = ckpt["vae_sha256"] if ckpt else file_sha256(args.vae_ckpt)
    args.latent_dim = vae_net.latent_dim
    torch.manual_seed(args.seed)
    train_x, _ = load_mnist(args.data_dir, train=True, device=device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_LATENTS)
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
    ema_fn = make_model_fn(ema, device, args.amp)  # samplers eager, as in ddpm.py
    log(run_description(args, net, vae_config, scale, len(train_x), steps_per_epoch, total_steps, device))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def save():
        save_checkpoint(ckpt_path, "latent_diffusion", args, step, step // steps_per_epoch, device, model=net, ema=ema,
                        optimizer=opt, latent_scale=scale, vae_sha256=vae_sha256)

    meter, t_start = Meter(step, total_steps, steps_per_epoch, args.batch_size, args.log_every, device), time.perf_counter()
    net.train()
    try:
        while step < total_steps:
            for (rows,) in epoch_batches((posterior,), step, steps_per_epoch, args.batch_size, args.seed):
                opt.param_groups[0]["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)  # linear warm-up
                u0 = draw_latents(rows) / scale  # a fresh z ~ q(z | x) for each digit of the batch, scaled
                loss, t = ddpm.diffusion_loss(train_fn, sched, u0, args.pred)
                opt.zero_grad(set_to_none=True)
                loss.mean().backward()
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
                ddpm.ema_update(ema_params, params, ddpm.ema_decay(step, args.ema_decay))
                step += 1
                meter.add("loss", loss)
                meter.add("by t quarter", loss, group=t * 4 // args.timesteps, groups=4)  # t in [0, T/4), ...
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # a grid every --sample-every epochs and at the end, then the checkpoint
                epoch, done = divmod(step, steps_per_epoch)
                if (done == 0 and epoch % args.sample_every == 0) or step >= total_steps:
                    name = f"samples_epoch_{epoch:03d}" if done == 0 else f"samples_step_{step:06d}"  # a mid-epoch stop
                    save_grid(ema_fn, sched, vae_net, scale, args, device, os.path.join(args.out_dir, name + ".png"))
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {ckpt_path} at step {step}; continue with --resume")
        sys.exit(130)
    finish(args, device, ema_fn, sched, vae_net, vae_config, scale, test_x, meter, step, steps_per_epoch,
           time.perf_counter() - t_start, sum(p.numel() for p in params))


# ---------------------------------------------------------------------------------------
# 6. Evaluation and main
# ---------------------------------------------------------------------------------------

# A Gaussian VAE's bounds also in bits/dim (vae.py sec. 5); test_bpd: this chapter's, the diffusion prior's.
BPD_KEYS = {"test_bound_diffusion": "test_bpd", "test_bound_standard": "test_bpd_standard",
            "test_neg_elbo": "test_bpd_neg_elbo", "test_iwae_nll": "test_bpd_iwae", "test_recon": "test_bpd_recon"}


@torch.no_grad()
def evaluate(ema_fn, sched, vae_net, vae_config, scale, test_x, args, device):
    """On the first --eval-images test digits (binarized / dequantized once, as vae.py does),
    nats per digit: the VAE's bound with its N(0, I) prior and with the diffusion prior, the
    same z for both; the VAE's own negative ELBO (closed-form KL) and, with --iw-samples, its
    IWAE bound. Also the comparison picture, the sampling speed and, with --score-samples, the
    scores of the diffusion prior's samples."""
    test_data, gen = vae.eval_data(test_x, vae_config["likelihood"], vae_config["binarize"], args.seed, device)
    save_comparison(ema_fn, sched, vae_net, scale, test_data, args, device, os.path.join(args.out_dir, "compare.png"))
    m = {"bound_units": "nats per digit" if vae_config["likelihood"] == "bernoulli" else "bits/dim (dequantized)"}
    n = min(args.eval_images, len(test_data))
    if n:
        log(f"bounds: {n} test digits, the diffusion prior with {args.timesteps} denoiser calls each (--eval-images)")
        t0, batch, parts = time.perf_counter(), 500, {}
        for i in range(0, n, batch):
            x = test_data[i:min(i + batch, n)]
            eps = torch.randn((len(x), vae_net.latent_dim), device=device, generator=gen)
            recon, standard, diffusion = vae_bound(vae_net, x, eps, standard_normal_nll,
                                                   lambda z: prior_bound(ema_fn, sched, z, scale, args.pred, gen))
            r, kl = vae.elbo_terms(vae_net, vae_net, x, eps)
            for key, value in (("test_recon", recon), ("test_bound_standard", recon + standard),
                               ("test_bound_diffusion", recon + diffusion), ("test_neg_elbo", r + kl)):
                parts.setdefault(key, []).append(value)
        m.update({**{key: torch.cat(v).mean().item() for key, v in parts.items()},
                  "test_images": n, "bound_seconds": time.perf_counter() - t0})
        if args.iw_samples:
            log(f"IWAE of the VAE: {n} test digits x K = {args.iw_samples} decoder calls")
            bounds = [vae.iwae_bound(vae_net.encode, lambda x_, z: vae_net.log_likelihood(x_, vae_net.decode(z)),
                                     test_data[i:min(i + 16, n)], args.iw_samples, generator=gen) for i in range(0, n, 16)]
            m.update({"test_iwae_nll": -torch.cat(bounds).mean().item(), "test_iwae_k": args.iw_samples, "test_iwae_images": n})
        if vae_config["likelihood"] == "gaussian":  # nats of a density on [0, 1]^784 -> 8-bit bits/dim
            m.update({BPD_KEYS[k]: vae.bits_per_dim_dequantized(m[k]) for k in BPD_KEYS if k in m})
    t0 = time.perf_counter()
    draw_digits(ema_fn, sched, vae_net, scale, 1000, args, gen)
    m["sample_images_per_sec"] = 1000 / (time.perf_counter() - t0)
    if args.score_samples:
        m["score"] = score_run(ema_fn, sched, vae_net, scale, args, device)
    return m


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        eval_only(args)
    else:
        train(args)


# =======================================================================================
# Run plumbing of this script: checks, evaluation of a checkpoint, the end of a run, pictures
# =======================================================================================
# The shared plumbing is ddpm.py's appendix, imported; its error lines name this script once
# parse_args has set ddpm.PROG.

def parse_args(argv=None):
    """The knobs at the top of the file, read from the command line; bad input is one line."""
    ddpm.PROG = os.path.basename(__file__)  # "latent_diffusion.py: error: ..." from the shared plumbing too
    parser = make_parser()
    parser.prog, parser.error = ddpm.PROG, fail  # argparse's own errors as one line too
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """The checks no single argparse type can make."""
    if args.vae_ckpt is None and not (args.resume or args.eval_only):
        fail("a new run needs --vae-ckpt, a checkpoint of vae.py (e.g. out/vae/ckpt.pt)")
    for name in ("ema_decay", "dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    ddpm.check_sampler(args)
    if args.score_samples:
        try:
            import score
        except ImportError:
            fail("--score-samples needs score.py, this project's sample scorer, beside this script")
        score.check_classifier(args.classifier, args.data_dir)


def eval_only(args):
    """Evaluate out-dir/ckpt.pt's EMA denoiser on its VAE (checked unchanged): bounds, picture, speed."""
    device = setup(args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "latent_diffusion")
    for key in MODEL_KEYS + ("seed", "vae_ckpt"):
        setattr(args, key, ckpt["config"][key])
    vae_net, vae_config = load_vae(args.vae_ckpt, device, ckpt["vae_sha256"])
    ema = build_model(ckpt["config"]).to(device).eval()
    ema.load_state_dict(ckpt["ema"])
    sched = ddpm.make_schedule(args.schedule, args.timesteps, device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {ckpt_path} (step {ckpt['step']}, EMA weights)")
    metrics = {"checkpoint": ckpt_path, "step": ckpt["step"], "device": describe(device)}
    metrics.update(evaluate(make_model_fn(ema, device, args.amp), sched, vae_net, vae_config,
                            ckpt["latent_scale"], test_x, args, device))
    log(summary(metrics))
    write_json(metrics, os.path.join(args.out_dir, "eval.json"))


def finish(args, device, ema_fn, sched, vae_net, vae_config, scale, test_x, meter, step, steps_per_epoch, wall, n_params):
    """The end of a run: held-out bounds and pictures of the EMA denoiser, metrics.json, a summary line."""
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch,
               "train_seconds": meter.training_seconds(), "train_loss": meter.last.get("loss", math.nan),
               "train_images_per_sec": meter.images_per_sec(step * args.batch_size, wall),  # a latent per digit
               "wall_time_s": wall, "device": describe(device), "parameters": n_params, "latent_scale": scale}
    metrics.update(evaluate(ema_fn, sched, vae_net, vae_config, scale, test_x, args, device))
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {metrics['train_loss']:.4f} | {summary(metrics)}")


def summary(m):
    """One line of the held-out numbers: nats per digit, or bits/dim for a Gaussian VAE."""
    get, unit = ((lambda k: m[BPD_KEYS[k]]), "bits/dim") if "test_bpd" in m else ((lambda k: m[k]), "nats")
    s = "" if "test_images" not in m else (
        f"bound with N(0, I) {get('test_bound_standard'):.3f} {unit}, with the diffusion prior "
        f"{get('test_bound_diffusion'):.3f} (the VAE's own -ELBO {get('test_neg_elbo'):.3f}"
        + (f", IWAE K={m['test_iwae_k']} {get('test_iwae_nll'):.3f}" if "test_iwae_k" in m else "")
        + f"; {m['test_images']} test digits) | ")
    s += f"{m['sample_images_per_sec']:,.0f} samples/s"
    if "fd" in m.get("score", {}):
        s += f" | FD {m['score']['fd']:.2f} ({m['score']['n']} samples)"
    return s


def run_description(args, net, vae_config, scale, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the denoiser, the VAE and its latents, the diffusion, the run length."""
    return (f"latent_diffusion: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters (residual MLP "
            f"{args.depth} x {args.width}) on the {args.latent_dim}-d latents of {args.vae_ckpt} ({vae_config['arch']}, "
            f"{vae_config['likelihood']}), scale s = {scale:.4f} | {args.schedule} schedule, T={args.timesteps}, "
            f"pred={args.pred} | {n_train} train digits, batch {args.batch_size}, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps | device {device.type}")


def save_grid(model_fn, sched, vae_net, scale, args, device, path):
    """--num-samples digits from the same noise every call (the DDPM's steps, one decoder pass), as a grid."""
    gen, t0 = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID), time.perf_counter()
    x = draw_digits(model_fn, sched, vae_net, scale, args.num_samples, args, gen).cpu()
    speed = args.num_samples / (time.perf_counter() - t0)
    save_image(x, path, nrow=int(math.ceil(math.sqrt(args.num_samples))))
    log(f"wrote {path} ({speed:,.0f} samples/s)")


@torch.no_grad()
def save_comparison(model_fn, sched, vae_net, scale, test_data, args, device, path, per_block=8):
    """Three blocks of per_block^2 digits side by side: the decoder's mean at z ~ N(0, I) (vae.py's samples), at z
    from the diffusion prior, and at the posterior mean of test digits (reconstructions: the best it can draw)."""
    n, gen = per_block * per_block, torch.Generator(device=device).manual_seed(args.seed + SEED_GRID)
    plain = vae_net.mean(vae_net.decode(torch.randn((n, vae_net.latent_dim), device=device, generator=gen)))
    prior = draw_digits(model_fn, sched, vae_net, scale, n, args, gen)
    recon = vae_net.mean(vae_net.decode(vae_net.encode(test_data[:n])[0]))
    blank = torch.ones((per_block, 1, 1, 28, 28), device=device)
    rows = [b.view(per_block, per_block, 1, 28, 28) for b in (plain, prior, recon)]
    grid = torch.cat([rows[0], blank, rows[1], blank, rows[2]], dim=1)  # (rows, 3 blocks + 2 gaps, ...)
    save_image(grid.reshape(-1, 1, 28, 28).cpu(), path, nrow=3 * per_block + 2)
    log(f"wrote {path}: decoded N(0, I) draws | decoded diffusion-prior draws | reconstructions of test digits")


def score_run(ema_fn, sched, vae_net, scale, args, device):
    """--score-samples N: N digits from the diffusion prior (the grids' sampler), scored by score.py."""
    import score
    steps = args.timesteps if args.sampler == "ddpm" else args.sample_steps or min(50, args.timesteps)
    cost = f"{args.sampler}{f', eta {args.eta:g}' if args.sampler == 'ddim' else ''}: {steps} denoiser calls and one decoder pass"
    return score.draw_and_score(lambda n, gen: draw_digits(ema_fn, sched, vae_net, scale, n, args, gen),
                                args.score_samples, device, cost, args.classifier, args.data_dir, args.seed)


if __name__ == "__main__":
    main()
