"""
discrete_diffusion.py: diffusion on discrete pixels (D3PM, Austin et al. 2021), in one file.

ddpm.py treats a pixel as a real number and corrupts it with Gaussian noise. Here a pixel is
one of K categories (default K = 2: black or white), and the corruption is a Markov chain on
those categories, one transition matrix per step (rows: from, columns: to). Time indices are
0-based as in ddpm.py: t = 0 .. T-1, the digit is x0, and x_t is x0 after t + 1 transitions (the
paper's x_{t+1}; x_{-1} below is x0):

    forward  q(x_t | x_{t-1}) = Cat(x_t; x_{t-1} Q_t)          x a one-hot row, Q_t rows sum to 1
    closed   q(x_t | x0)      = Cat(x_t; x0 Q-bar_t),          Q-bar_t = Q_0 Q_1 ... Q_t
    reverse  p(x_{t-1} | x_t) = sum_{x0} q(x_{t-1}, x_t | x0) p~(x0 | x_t)   (a U-Net predicts p~)

--transition picks the matrices: uniform (a pixel jumps to any of the K values, Hoogeboom et
al. 2021), absorbing (it jumps to an extra [MASK] state and stays there: masked-token models
such as BERT are the one-step case), gaussian (K > 2: it jumps to nearby levels more often).
Training minimises the variational bound plus a little cross-entropy on x0 (D3PM eq. 5); the
bound on the test digits is an upper bound on their negative log-likelihood, in nats per digit. At K = 2 the digits are binarized
exactly as vae.py binarizes them, so the nats compare with the VAE's -ELBO and IWAE bound.

Run:
    python discrete_diffusion.py --data-dir ../shared/mnist                          # absorbing, K = 2 (a GPU)
    python discrete_diffusion.py --data-dir ../shared/mnist --timesteps 100 --channels 16 --channel-mult 1,2 \
        --num-blocks 1 --no-attention --batch-size 32 --lr 1e-3 --warmup-steps 100 --minutes 18
                                                                 # a CPU: digits in 20 minutes (README)
    python discrete_diffusion.py --data-dir ../shared/mnist --transition uniform --out-dir out/dd_uniform
    python discrete_diffusion.py --data-dir ../shared/mnist --levels 256 --transition gaussian --out-dir out/dd_256
    python discrete_diffusion.py --eval-only --eval-images 500                       # the bound of its ckpt.pt
    python discrete_diffusion.py --eval-only --eval-images 0 --score-samples 1000    # FD of the samples (score.py)

Writes to --out-dir (default out/discrete_diffusion): ckpt.pt (raw + EMA weights, optimizer,
step, RNG), samples_epoch_NNN.png and samples.png (EMA weights, all T steps), corruption.png
(x0, then x_t up to x_{T-1}, for test digits), unmasking.png (absorbing: when each pixel was unmasked),
metrics.json (config, losses, the bound, speed); --eval-only: eval_*.png and eval.json.

Reading order: the knobs -> data as categories -> transition matrices and schedules ->
forward process and posterior -> the reverse model -> loss -> sampler -> the bound -> EMA ->
train() -> evaluate() -> main(), then extensions (pictures of the process, fewer sampling
steps), this script's run plumbing, and the appendix shared by every script.
Time indices are 0-based: t in [0, T), x_{T-1} is fully corrupted, x0 is the data.
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

import torch
import torch.nn.functional as F

from unet import UNet


def make_parser():
    """The knobs: every default of a run, on one screen. `python discrete_diffusion.py --help` lists them."""
    p = argparse.ArgumentParser(description="Train or evaluate a discrete diffusion model (D3PM) on MNIST.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--out-dir", default="out/discrete_diffusion", help="checkpoint, pictures, metrics.json")
    g.add_argument("--epochs", type=positive_int, default=100, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate after warm-up")
    g.add_argument("--warmup-steps", type=positive_int, default=500, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--minutes", type=positive_float, default=None,
                   help="stop after this much training time (grids and evaluation not counted), summed over --resume")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training network: for long runs (a cold compile costs about a minute)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the network (default: on CUDA only)")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines")
    g.add_argument("--sample-every", type=positive_int, default=10, help="epochs between sample grids")
    g.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    g.add_argument("--eval-only", action="store_true", help="evaluate out-dir/ckpt.pt instead of training")
    g.add_argument("--eval-images", type=nonneg_int, default=256,
                   help="test digits for the bound (T network calls each; 0 skips it)")

    g = p.add_argument_group("model")
    g.add_argument("--block", choices=["resnet", "shuffle"], default="resnet",
                   help="U-Net block type (ddpm.py's name; until 2026-12-07 this flag was --arch)")
    g.add_argument("--channels", type=positive_int, default=32, help="width of the first U-Net level")
    g.add_argument("--channel-mult", default="1,2,2", help="width multiplier per level (28 -> 14 -> 7)")
    g.add_argument("--num-blocks", type=positive_int, default=2, help="residual blocks per level")
    g.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                   help="self-attention at the lowest resolution")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the residual blocks")

    g = p.add_argument_group("discrete diffusion")
    g.add_argument("--levels", type=number_at_least(int, 2), default=2,
                   help="K categories per pixel: 2 = binarized digits (as vae.py's), 256 = the 8-bit digits")
    g.add_argument("--transition", choices=["absorbing", "uniform", "gaussian"], default="absorbing",
                   help="where a pixel jumps: to [MASK], to any level, or (K > 2) to nearby levels")
    g.add_argument("--timesteps", type=positive_int, default=1000, help="T (D3PM: 1000)")
    g.add_argument("--hybrid-coeff", type=float, default=0.001,
                   help="lambda of the cross-entropy on x0 added to one step's KL (D3PM's 0.001); 0: the bound alone")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="maximum EMA decay (warmed up from 0)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sample-steps", type=positive_int, default=None,
                   help="reverse steps (default T: ancestral over every step); fewer: the exact reverse of a "
                        "coarser chain")
    g.add_argument("--num-samples", type=positive_int, default=64, help="images per sample grid")
    g.add_argument("--score-samples", type=nonneg_int, default=0,
                   help="at the end (also with --eval-only): draw N samples and score them with score.py "
                        "(FD, IS, precision/recall; N >= 1000 for FDs that compare); 0: off")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt", help="score.py's digit classifier")
    return p


# The flags that define a trained model: a resumed or evaluated run takes them from its checkpoint.
MODEL_KEYS = ("block", "channels", "channel_mult", "num_blocks", "attention", "dropout", "levels", "transition",
              "timesteps")


# ---------------------------------------------------------------------------------------
# 0. Data as categories
# ---------------------------------------------------------------------------------------
# A digit is a (28, 28) grid of integers in [0, K). K = 2: each pixel is drawn once more from
# Bernoulli(pixel / 255) every time a training digit is seen (dynamic binarization, as in
# vae.py and Burda et al. 2016); the test digits are binarized once, with the generator vae.py
# uses (seed + SEED_EVAL, the whole test split in one draw), so both bounds are on the same
# binary digits. K > 2: the 8-bit value k becomes level floor(k K / 256); K = 256 is k itself.

def binarize(images_u8, generator=None):
    """uint8 (B, 28, 28) -> float (B, 1, 28, 28) in {0, 1}: x ~ Bernoulli(k / 255), vae.py's draw."""
    return torch.bernoulli(images_u8.unsqueeze(1).float() / 255, generator=generator)


def to_categories(images_u8, levels, generator=None):
    """uint8 (B, 28, 28) -> long (B, 28, 28) in [0, levels): binarized (K = 2) or quantized."""
    if levels == 2:
        return binarize(images_u8, generator).squeeze(1).long()
    return images_u8.long() * levels // 256


def to_pixels(x, levels):
    """Categories (B, 28, 28) -> grey values (B, 1, 28, 28) in [0, 1]; [MASK] (= levels) is mid-grey."""
    return torch.where(x == levels, 0.5, x.float() / (levels - 1)).unsqueeze(1)


# ---------------------------------------------------------------------------------------
# 1. The network
# ---------------------------------------------------------------------------------------
# unet.py's U-Net reads x_t as S one-hot channels (S = K, or K + 1 with [MASK]) scaled to
# [-1, 1], and t; it outputs K logits of x0 per pixel: (B, S, 28, 28), (B,) -> (B, K, 28, 28).

def num_states(levels, transition):
    return levels + 1 if transition == "absorbing" else levels


def parse_channel_mult(text):
    try:
        mult = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        mult = ()
    if not mult or min(mult) < 1:
        raise ValueError(f"--channel-mult must be comma-separated positive integers, got {text!r}")
    return mult


def block_of(config):
    """The U-Net's block of a config; a checkpoint from before 2026-12-07 named it "arch"."""
    return config.get("block") or config["arch"]


def build_model(config):
    """The U-Net described by a config dict (the argparse namespace, or a checkpoint's)."""
    return UNet(in_channels=num_states(config["levels"], config["transition"]), out_channels=config["levels"],
                channels=config["channels"], channel_mult=parse_channel_mult(config["channel_mult"]),
                num_blocks=config["num_blocks"], attention=config["attention"], dropout=config["dropout"],
                block=block_of(config), num_classes=None)


def x0_log_probs(model_fn, x_t, t, states):
    """log p~(x0 | x_t) per pixel: (B, 28, 28) categories -> (B, 28, 28, K) log-probabilities."""
    one_hot = F.one_hot(x_t, states).permute(0, 3, 1, 2).float() * 2 - 1
    return F.log_softmax(model_fn(one_hot, t).permute(0, 2, 3, 1), dim=-1)


# ---------------------------------------------------------------------------------------
# 2. Transition matrices and their schedules (D3PM sec. 3.1 and appendix A.2)
# ---------------------------------------------------------------------------------------
# Q_t[i, j] = q(x_t = j | x_{t-1} = i). Every matrix here has rows that sum to one, and all
# of them are kept as log-probabilities: the model multiplies many of them, and a product of
# small probabilities underflows where a sum of logs does not. A probability that is exactly
# zero (a pixel never leaves [MASK]) is stored as LOG_ZERO, which exp() turns back into 0.
# The schedules are the paper's: each ends in a distribution that no longer depends on x0.

LOG_ZERO = -1e4


def cosine_alpha_bar(T, s=0.008):
    """uniform (Hoogeboom et al. 2021, after Nichol & Dhariwal 2021, eq. 17): the chance that a
    pixel has not been resampled by step t, alpha_bar_t = f((t + 1)/T) / f(0), with
    f(u) = cos^2(((u + s)/(1 + s)) pi/2). It reaches 0 at t = T-1, so x_{T-1} is uniform.
    (D3PM's code uses cos without the square and caps beta at 0.999.)"""
    def f(u):
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (f((torch.arange(T, dtype=torch.float64) + 1) / T) / f(torch.zeros(1, dtype=torch.float64))).clamp(min=0)


def absorbing_alpha_bar(T):
    """absorbing, D3PM's mutual-information schedule: beta_t = 1/(T - t) (the paper's 1/(T - t + 1),
    1-indexed), so alpha_bar_t = prod_s (1 - beta_s) = 1 - (t + 1)/T: the same share of pixels is
    masked at every step, and all of them at t = T-1."""
    return 1 - (torch.arange(T, dtype=torch.float64) + 1) / T


def gaussian_kernel(beta, K):
    """D3PM appendix A.2.2: jumps to nearby levels, Q[i, j] proportional to exp(-4 (i - j)^2 / ((K-1)^2 beta))
    for i != j, normalised over all offsets -(K-1) .. K-1; what is left stays on the diagonal."""
    levels = torch.arange(K, dtype=torch.float64)
    weights = torch.exp(-4 * (levels[:, None] - levels[None, :]) ** 2 / ((K - 1) ** 2 * beta))
    offsets = torch.arange(-(K - 1), K, dtype=torch.float64)
    Q = weights / torch.exp(-4 * offsets ** 2 / ((K - 1) ** 2 * beta)).sum()
    Q.fill_diagonal_(0)
    return Q + torch.diag(1 - Q.sum(1))


def transition_matrices(transition, K, T):
    """(Q, Q_bar, prior): the one-step matrices Q_t and the cumulative Q-bar_t = Q_0 ... Q_t,
    each (T, S, S) float64 probabilities, and p(x_{T-1}) (S,), where x_{T-1} ends.

    uniform and absorbing (D3PM eq. 6 and appendix A.2.1) are a mix of "stay" and "jump to pi":
        Q_t     = (1 - beta_t) I + beta_t 1 pi^T,      pi = uniform over K, or [MASK]
        Q-bar_t = alpha_bar_t I + (1 - alpha_bar_t) 1 pi^T    (closed form: no product needed)
    gaussian: beta_t linear from 1e-4 to 0.02 for T = 1000 (D3PM's images; both ends scaled by
    1000/T for other T, as ddpm.py's linear schedule), Q-bar_t by matrix products; the kernel is
    symmetric, so it ends near uniform."""
    if transition == "gaussian":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64) * 1000 / T
        Q = torch.stack([gaussian_kernel(b, K) for b in betas])
        Q_bar = torch.stack(list(cumulative_products(Q)))
        return Q, Q_bar, torch.full((K,), 1.0 / K, dtype=torch.float64)
    alpha_bar = absorbing_alpha_bar(T) if transition == "absorbing" else cosine_alpha_bar(T)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = torch.where(alpha_bar_prev > 0, 1 - alpha_bar / alpha_bar_prev, 1.0)  # beta_t = 1 - ab_t / ab_{t-1}
    S = num_states(K, transition)
    pi = torch.zeros(S, dtype=torch.float64)
    if transition == "absorbing":
        pi[K] = 1.0
    else:
        pi[:] = 1.0 / K
    eye, jump = torch.eye(S, dtype=torch.float64), torch.ones(S, 1, dtype=torch.float64) * pi  # jump = 1 pi^T
    Q = (1 - betas)[:, None, None] * eye + betas[:, None, None] * jump
    Q_bar = alpha_bar[:, None, None] * eye + (1 - alpha_bar)[:, None, None] * jump
    return Q, Q_bar, pi


def cumulative_products(Q):
    """Q_0, Q_0 Q_1, Q_0 Q_1 Q_2, ...: the cumulative products (float64: sums of products of two
    probabilities at a time, no long product of small numbers)."""
    acc = None
    for q in Q:
        acc = q if acc is None else acc @ q
        yield acc


def safe_log(p):
    return torch.log(p).clamp(min=LOG_ZERO)


def make_schedule(transition, K, T, device="cpu"):
    """Everything the model needs, as float32 log-probabilities:
        log_Q[t]     = log Q_t                          (T, S, S)
        log_Q_bar[t] = log Q-bar_{t-1}, log_Q_bar[0] = log I    (T + 1, S, S): index t is one step behind,
                       so that log_Q_bar[t] is what the posterior at step t needs and log_Q_bar[t + 1] is q(x_t | x0)
        log_prior    = log p(x_{T-1})                   (S,)
    Q-bar_{-1} = I says "x0 is x0": with it the last reverse step (to x0) is the same formula as the others."""
    Q, Q_bar, prior = transition_matrices(transition, K, T)
    S = Q.shape[-1]
    Q_bar = torch.cat([torch.eye(S, dtype=torch.float64)[None], Q_bar])
    sched = {"log_Q": safe_log(Q), "log_Q_bar": safe_log(Q_bar), "log_prior": safe_log(prior)}
    sched = {k: v.to(device=device, dtype=torch.float32) for k, v in sched.items()}
    sched.update(levels=K, states=S, timesteps=T)
    return sched


# ---------------------------------------------------------------------------------------
# 3. Forward process and its posterior
# ---------------------------------------------------------------------------------------

def sample_categorical(logits, generator=None):
    """One draw per row of unnormalised log-probabilities (..., S) -> (...): the Gumbel-max trick,
    argmax(logits + g), g = -log(-log u), u ~ U(0, 1), samples softmax(logits) in log space."""
    u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp(min=1e-30)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def q_sample(sched, x0, t, generator=None):
    """x_t ~ q(x_t | x0) = Cat(x0 Q-bar_t) (D3PM eq. 3, left): the row x0 of Q-bar_t for each pixel."""
    return sample_categorical(sched["log_Q_bar"][t.view(-1, 1, 1) + 1, x0], generator)


def posterior_logits(log_Q_t, log_Q_bar_prev, x_t, log_x0_weights):
    """log q(x_{t-1} | x_t, x0) for every value of x_{t-1}, normalised (B, 28, 28, S). D3PM eq. 3:

        q(x_{t-1} | x_t, x0) = q(x_t | x_{t-1}) q(x_{t-1} | x0) / q(x_t | x0)
                             proportional to  Q_t[:, x_t]  *  x0 Q-bar_{t-1}      (Bayes' rule)

    log_Q_t, log_Q_bar_prev: (B, S, S), each image's log Q_t and log Q-bar_{t-1}; x_t: (B, 28, 28).
    log_x0_weights (B, 28, 28, K): log of a distribution over x0, one-hot for the true posterior
    (log 1 at x0, LOG_ZERO elsewhere). For the model's reverse step it is log p~(x0 | x_t), and
    the second factor becomes sum_x0 p~(x0 | x_t) Q-bar_{t-1}[x0, :] (D3PM eq. 4): the posterior
    averaged over the network's belief about x0. One function for both, so they cannot disagree."""
    B, K = x_t.shape[0], log_x0_weights.shape[-1]
    batch = torch.arange(B, device=x_t.device).view(-1, 1, 1)
    from_each_prev = log_Q_t[batch, :, x_t]                                     # log q(x_t | x_{t-1} = j), j = 0..S-1
    to_each_prev = log_matmul_exp(log_x0_weights.flatten(1, 2), log_Q_bar_prev[:, :K]).view(*x_t.shape, -1)
    return F.log_softmax(from_each_prev + to_each_prev, dim=-1)


def log_matmul_exp(log_a, log_b):
    """log(exp(log_a) @ exp(log_b)) for batches of matrices, (B, N, K) @ (B, K, S), without
    leaving log space: the largest entry of each row of a and of each column of b is taken out
    before the product, so what is exponentiated is at most 1 and the largest term is exact
    (float64: terms down to e^-700 of the largest survive; an exact zero becomes LOG_ZERO)."""
    max_a, max_b = log_a.amax(-1, keepdim=True), log_b.amax(-2, keepdim=True)
    product = torch.exp((log_a - max_a).double()) @ torch.exp((log_b - max_b).double())
    return (torch.log(product).float() + max_a + max_b).clamp(min=LOG_ZERO)


def one_hot_log(x0, K):
    """log of the one-hot distribution at x0: 0 there, LOG_ZERO elsewhere. (B, 28, 28) -> (B, 28, 28, K)."""
    return F.one_hot(x0, K).float().sub(1).mul(-LOG_ZERO)


def q_posterior_logits(sched, x0, x_t, t):
    """The true posterior log q(x_{t-1} | x_t, x0) at each image's step t (B,): (B, 28, 28, S).
    posterior_logits with one-hot weights at x0, whose average over x0 is just the row x0 of
    Q-bar_{t-1}: taken directly (the same numbers, tested; K times less work than the product)."""
    t = t.view(-1, 1, 1)
    return F.log_softmax(sched["log_Q"][t, :, x_t] + sched["log_Q_bar"][t, x0], dim=-1)


def p_logits(sched, log_x0, x_t, t):
    """The model's reverse step log p(x_{t-1} | x_t) from log p~(x0 | x_t) (D3PM eq. 4): (B, 28, 28, S).
    At t = 0 it is p(x0 | x_t) proportional to q(x_t | x0) p~(x0 | x_t) (Q-bar_{-1} = I): a pixel that is
    not masked at t = 0 is known exactly, whatever the network says.
    What the best p~ is: the true reverse step, sum_x0 q(x_{t-1} | x_t, x0) q(x0 | x_t), divides each
    x0's term by q(x_t | x0), which eq. 4's one normalisation over x_{t-1} leaves out. So the bound is
    lowest for p~ proportional to q(x0 | x_t) / q(x_t | x0), not for the posterior of x0 itself. They
    agree where q(x_t | x0) is the same for every x0 (a masked pixel); for uniform they differ, and
    the cross-entropy, which pulls p~ towards the posterior, is one more reason to keep lambda small."""
    return posterior_logits(sched["log_Q"][t], sched["log_Q_bar"][t], x_t, log_x0)


# ---------------------------------------------------------------------------------------
# 4. The loss: one term of the bound plus a cross-entropy on x0 (D3PM eq. 5)
# ---------------------------------------------------------------------------------------
# -log p(x0) <= L = L_prior + sum_{t=1}^{T-1} L_t + L_0                 (D3PM eq. 1, 0-indexed)
#   L_prior = KL(q(x_{T-1} | x0) || p(x_{T-1}))                      0 here: every schedule ends mixed
#   L_t     = E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))       categorical vs categorical
#   L_0     = -E_q log p(x0 | x at t = 0)                            the "decoder"
# Training draws one t per digit. L_vb alone is a noisy signal for the network (D3PM sec. 3.4);
# adding lambda * E[-log p~(x0 | x_t)], a direct cross-entropy on the network's own output,
# gives it a steady one. lambda multiplies the cross-entropy against one step's L_t, as in
# D3PM's code (their 0.001): against the whole bound, T L_t, that is a weight of lambda T
# (1 at T = 1000). All figures are summed over the 784 pixels: nats per digit.

def categorical_kl(log_q, log_p):
    """KL(q || p) = sum_j q_j (log q_j - log p_j) over the last dimension, in nats (0 log 0 = 0)."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def prior_kl(sched, x0):
    """L_prior = KL(q(x_{T-1} | x0) || p(x_{T-1})) of each digit, nats (B,)."""
    T = sched["timesteps"]
    log_q = sched["log_Q_bar"][T][x0]                       # q(x_{T-1} | x0) = x0 Q-bar_{T-1}
    return categorical_kl(log_q, sched["log_prior"].expand_as(log_q)).sum((1, 2))


def step_terms(model_fn, sched, x0, t, generator=None):
    """At each digit's step t (B,): the bound's term L_t (KL, or the decoder's -log p at t = 0)
    and the cross-entropy -log p~(x0 | x_t), each (B,) in nats per digit, with x_t ~ q(x_t | x0)."""
    x_t = q_sample(sched, x0, t, generator)
    log_x0 = x0_log_probs(model_fn, x_t, t, sched["states"])
    log_p = p_logits(sched, log_x0, x_t, t)
    kl = categorical_kl(q_posterior_logits(sched, x0, x_t, t), log_p)
    decoder_nll = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)          # L_0 = -log p(x0 | x at t = 0)
    term = torch.where((t == 0).view(-1, 1, 1), decoder_nll, kl).sum((1, 2))
    cross_entropy = -log_x0.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum((1, 2))
    return term, cross_entropy


def diffusion_loss(model_fn, sched, x0, hybrid_coeff, generator=None):
    """Per digit (B,): the hybrid loss L_t + lambda CE, the unbiased estimate T L_t + L_prior of the
    whole bound, and the timesteps t ~ Uniform{0..T-1} drawn."""
    T = sched["timesteps"]
    t = torch.randint(0, T, (x0.shape[0],), device=x0.device, generator=generator)
    term, cross_entropy = step_terms(model_fn, sched, x0, t, generator)
    return term + hybrid_coeff * cross_entropy, T * term + prior_kl(sched, x0), t


# ---------------------------------------------------------------------------------------
# 5. Ancestral sampling
# ---------------------------------------------------------------------------------------
# Start from p(x_{T-1}) (absorbing: every pixel [MASK]; uniform: coin flips), then draw
# x_{t-1} ~ p(x_{t-1} | x_t) T times. Each step is the posterior of section 3 averaged over
# the network's p~(x0 | x_t); pixels are drawn independently given x_t, which is why many
# small steps matter: per step, few pixels change and their dependence is carried by x_t.

@torch.no_grad()
def sample(model_fn, sched, n, steps=None, generator=None, on_step=None, shape=(28, 28)):
    """n digits (n, 28, 28) in [0, K). steps < T: the coarser chain of reverse_grid (exact for
    its own forward process; see the extensions). on_step(x, t) after every step."""
    T, device = sched["timesteps"], sched["log_Q"].device
    x = sample_categorical(sched["log_prior"].expand(n, *shape, -1), generator)
    for t, log_Q_step, log_Q_bar_prev in reverse_grid(sched, steps or T):
        t_batch = torch.full((n,), t, device=device, dtype=torch.long)
        log_x0 = x0_log_probs(model_fn, x, t_batch, sched["states"])
        x = sample_categorical(posterior_logits(log_Q_step.expand(n, -1, -1), log_Q_bar_prev.expand(n, -1, -1),
                                                x, log_x0), generator)
        if on_step:
            on_step(x, t)
    return x


# ---------------------------------------------------------------------------------------
# 6. The bound on held-out digits
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def bound_nats(model_fn, sched, x0, generator=None):
    """The bound L of each digit of x0 (B, 28, 28), a dict of (B,) nats: total, prior, kl (the
    sum of the L_t, t >= 1), decoder (L_0). T network calls, one x_t ~ q(x_t | x0) per step."""
    T, B = sched["timesteps"], x0.shape[0]
    kl = torch.zeros(B, device=x0.device)
    for step in range(T - 1, 0, -1):
        kl += step_terms(model_fn, sched, x0, torch.full((B,), step, device=x0.device), generator)[0]
    decoder = step_terms(model_fn, sched, x0, torch.zeros(B, dtype=torch.long, device=x0.device), generator)[0]
    prior = prior_kl(sched, x0)
    return {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder}


# ---------------------------------------------------------------------------------------
# 7. Exponential moving average of the weights (as ddpm.py)
# ---------------------------------------------------------------------------------------

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

def train(args):
    device = setup(args)
    ckpt = start_or_resume(args, "discrete_diffusion", MODEL_KEYS + ("seed", "batch_size", "lr", "warmup_steps",
                                                                     "grad_clip", "ema_decay", "hybrid_coeff"))
    args.block = block_of(ckpt["config"]) if ckpt else args.block
    check_sample_steps(args)  # --resume: T is the checkpoint's
    torch.manual_seed(args.seed)
    train_x, _ = load_mnist(args.data_dir, train=True, device=device)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(args.out_dir)

    sched = make_schedule(args.transition, args.levels, args.timesteps, device)
    net = build_model(vars(args)).to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0, fused=fused_adam_ok(device))
    step = restore(ckpt, device, model=net, ema=ema, optimizer=opt) if ckpt else 0
    params, ema_params = list(net.parameters()), list(ema.parameters())
    train_fn = make_model_fn(net, device, args.amp, args.compile)
    ema_fn = make_model_fn(ema, device, args.amp)  # samplers eager, as in ddpm.py
    log(run_description(args, net, len(train_x), steps_per_epoch, total_steps, device))
    meter = Meter(step, total_steps, steps_per_epoch, args.batch_size, args.log_every, device)
    seconds_before, sample_speed, t_start = ckpt.get("train_seconds", 0.0) if ckpt else 0.0, None, time.perf_counter()

    def save():
        save_checkpoint(os.path.join(args.out_dir, "ckpt.pt"), "discrete_diffusion", args, step,
                        step // steps_per_epoch, device, model=net, ema=ema, optimizer=opt,
                        train_seconds=seconds_before + meter.training_seconds())

    net.train()
    try:
        while step < total_steps:
            for (images,) in epoch_batches((train_x,), step, steps_per_epoch, args.batch_size, args.seed):
                for group in opt.param_groups:  # linear warm-up of the learning rate
                    group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
                x0 = to_categories(images, args.levels)  # K = 2: a fresh binarization every time
                loss, bound, t = diffusion_loss(train_fn, sched, x0, args.hybrid_coeff)
                opt.zero_grad(set_to_none=True)
                (loss.mean() / x0[0].numel()).backward()  # per pixel: the scale the clip and Adam see
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
                opt.step()
                ema_update(ema_params, params, ema_decay(step, args.ema_decay))
                step += 1
                if args.minutes and seconds_before + meter.training_seconds() >= 60 * args.minutes:
                    total_steps = meter.total = step  # the time budget is spent: this step was the last
                meter.add("loss", loss)
                meter.add("bound", bound)  # T L_t + L_prior: an unbiased, noisy estimate of the bound
                meter.add("bound by t quarter", bound, group=t * 4 // args.timesteps, groups=4)
                meter.tick(step)
                if step >= total_steps:
                    break
            with meter.paused():  # a grid every --sample-every epochs and at the end, then the checkpoint
                epoch, whole = step // steps_per_epoch, step % steps_per_epoch == 0
                if (whole and epoch % args.sample_every == 0) or step >= total_steps:
                    path = os.path.join(args.out_dir, f"samples_epoch_{epoch:03d}.png" if whole
                                        else f"samples_step_{step:06d}.png")  # stopped mid-epoch (--max-steps)
                    sample_speed = save_grid(ema_fn, sched, args, device, path)
                    log(f"wrote {path} ({args.num_samples / sample_speed:.1f}s)")
                save()
    except KeyboardInterrupt:
        save()
        log(f"interrupted: saved {os.path.join(args.out_dir, 'ckpt.pt')} at step {step}; continue with --resume")
        sys.exit(130)
    finish(args, device, ema_fn, sched, test_x, meter, step, steps_per_epoch, time.perf_counter() - t_start,
           seconds_before + meter.training_seconds(), sample_speed, sum(p.numel() for p in params))


# ---------------------------------------------------------------------------------------
# 9. Evaluation and main
# ---------------------------------------------------------------------------------------

def test_categories(test_x, args, device):
    """The test digits as categories, drawn once: K = 2 binarized with vae.py's generator
    (seed + SEED_EVAL, the whole split at once), so the bounds of both are on the same digits."""
    return to_categories(test_x, args.levels, torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL))


@torch.no_grad()
def evaluate(model_fn, sched, test_x, args, device):
    """Held-out metrics: the training loss and its one-step estimate of the bound on the whole
    test split (cheap), and the bound itself on the first --eval-images digits (T calls each),
    in nats per digit (test_neg_elbo) and bits/dim (test_bpd, bits = nats / (784 ln 2))."""
    x0, batch = test_categories(test_x, args, device), args.batch_size
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_EVAL)
    parts = [diffusion_loss(model_fn, sched, x0[i:i + batch], args.hybrid_coeff, gen) for i in range(0, len(x0), batch)]
    metrics = {"test_loss": torch.cat([p[0] for p in parts]).mean().item(),
               "test_bound_estimate": torch.cat([p[1] for p in parts]).mean().item()}
    n = min(args.eval_images, len(x0))
    if n == 0:
        return metrics
    log(f"bound: {n} test digits x {args.timesteps} timesteps = {n * args.timesteps:,} network calls "
        f"(--eval-images sets how many)")
    t0 = time.perf_counter()
    parts = [bound_nats(model_fn, sched, x0[i:min(i + batch, n)], gen) for i in range(0, n, batch)]
    nats = {key: torch.cat([p[key] for p in parts]).mean().item() for key in parts[0]}
    bits = 1 / (x0[0].numel() * math.log(2))
    metrics.update(test_neg_elbo=nats["total"], test_bpd=nats["total"] * bits, test_bpd_prior=nats["prior"] * bits,
                   test_bpd_kl=nats["kl"] * bits, test_bpd_decoder=nats["decoder"] * bits, test_bpd_images=n)
    log(f"bound: {nats['total']:.2f} nats per digit = {metrics['test_bpd']:.4f} bits/dim (prior {nats['prior']:.4f}, "
        f"diffusion KLs {nats['kl']:.2f}, decoder {nats['decoder']:.2f} nats) in {time.perf_counter() - t0:.1f}s")
    return metrics


def eval_only(args):
    """Evaluate the EMA weights of out-dir/ckpt.pt: the bound, a grid, the pictures, the score."""
    device = setup(args)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "discrete_diffusion")
    for key in MODEL_KEYS + ("seed", "hybrid_coeff"):
        setattr(args, key, ckpt["config"].get(key))
    args.block = block_of(ckpt["config"])
    check_sample_steps(args)
    sched = make_schedule(args.transition, args.levels, args.timesteps, device)
    ema = build_model(ckpt["config"]).to(device).eval()
    ema.load_state_dict(ckpt["ema"])
    ema_fn = make_model_fn(ema, device, args.amp)
    test_x, _ = load_mnist(args.data_dir, train=False, device=device)
    log(f"evaluating {ckpt_path} (step {ckpt['step']}, EMA weights)")
    metrics = {"checkpoint": ckpt_path, "step": ckpt["step"], "device": describe(device)}
    metrics.update(evaluate(ema_fn, sched, test_x, args, device))
    metrics["sample_images_per_sec"] = write_pictures(ema_fn, sched, test_x, args, device, prefix="eval_")
    if args.score_samples:
        metrics["score"] = score_run(ema_fn, sched, args, device, metrics["sample_images_per_sec"])
    write_json(metrics, os.path.join(args.out_dir, "eval.json"))


def main(argv=None):
    args = parse_args(argv)
    if args.eval_only:
        eval_only(args)
    else:
        train(args)


# ---------------------------------------------------------------------------------------
# 10. Extensions: pictures of the process, and fewer sampling steps
# ---------------------------------------------------------------------------------------

def reverse_grid(sched, steps):
    """The reverse steps of the sampler: (t, log Q_{s->t}, log Q-bar_s) from t = T-1 down, s the
    next step (-1 after the last: x0). steps = T: s = t - 1 and Q_{s->t} = Q_t, ancestral sampling.

    steps < T: the grid T-1, ..., as ddpm.py's DDIM grid; between grid points the forward chain
    is q(x_t | x_s) = Cat(x_s Q_{s+1} ... Q_t), and q(x_t | x0) is unchanged. The posterior of
    that coarser chain is the same Bayes' rule with Q_{s->t} for Q_t, and the network's
    p~(x0 | x_t) needs no retraining: each step is the exact reverse of a coarser forward
    process (not of the trained T-step one), with more pixels drawn independently per step."""
    T = sched["timesteps"]
    grid = sorted({round(T - 1 - i * T / steps) for i in range(steps)}, reverse=True)
    for i, t in enumerate(grid):
        s = grid[i + 1] if i + 1 < len(grid) else -1
        if s == t - 1:
            log_Q_step = sched["log_Q"][t]
        else:  # the product of the one-step matrices s+1 .. t, in float64
            Q = sched["log_Q"][s + 1:t + 1].double().exp()
            log_Q_step = safe_log(torch.linalg.multi_dot(list(Q)) if len(Q) > 1 else Q[0]).float()
        yield t, log_Q_step, sched["log_Q_bar"][s + 1]


@torch.no_grad()
def corruption_strip(sched, x0, columns=10, generator=None):
    """The forward chain run step by step on digits x0 (B, 28, 28): x_{t} ~ Cat(x_{t-1} Q_t), kept at
    x0 and `columns - 1` steps evenly spaced from 0 to T-1. Returns (B * columns, 1, 28, 28) in [0, 1]."""
    T = sched["timesteps"]
    keep = {round(v) for v in torch.linspace(0, T - 1, columns - 1).tolist()}
    frames, x = [x0], x0
    for t in range(T):
        x = sample_categorical(sched["log_Q"][t][x], generator)   # the row x_{t-1} of Q_t, per pixel
        if t in keep:
            frames.append(x)
    return torch.stack([to_pixels(f, sched["levels"]) for f in frames], 1).flatten(0, 1)


def unmasking_picture(order, final, T):
    """Absorbing: the step at which each pixel left [MASK] (order (B, 28, 28), T-1 .. 0) as a colour
    (dark blue: first, near t = T-1; yellow: last, near t = 0), darkened where the final digit is
    background. Returns (B, 3, 28, 28) in [0, 1].
    The picture shows noise on purpose: with eq. 4, a masked pixel stays masked with probability
    p(x_{t-1} = MASK | x_t = MASK) = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) whatever p~ says (every x0
    is masked alike), so the order is uniformly random: the network decides what a pixel becomes,
    never when. (Samplers that unmask the most confident pixels first, as MaskGIT, are another model.)"""
    anchors = torch.tensor([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                            [0.99, 0.91, 0.14]], device=order.device)  # viridis at 0, 1/4, ..., 1
    u = (1 - order.float() / max(T - 1, 1)) * (len(anchors) - 1)   # 0 for the first step, 4 for the last
    lo = u.floor().long().clamp(max=len(anchors) - 2)
    colour = torch.lerp(anchors[lo], anchors[lo + 1], (u - lo).unsqueeze(-1))
    return (colour * (0.45 + 0.55 * final.float().clamp(0, 1)).unsqueeze(-1)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------
# 11. Run plumbing of this script
# ---------------------------------------------------------------------------------------

def check_args(args):
    """The checks no single argparse type can make."""
    try:
        parse_channel_mult(args.channel_mult)
    except ValueError as e:
        fail(str(e))
    if not 0.0 <= args.ema_decay < 1.0:
        fail(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.hybrid_coeff < math.inf:
        fail(f"--hybrid-coeff must be a number >= 0, got {args.hybrid_coeff}")
    if args.levels > 256:
        fail(f"--levels must be in [2, 256] (8-bit pixels have 256), got {args.levels}")
    if args.transition == "gaussian" and args.levels == 2 and not (args.eval_only or args.resume):
        fail("--transition gaussian needs --levels > 2 (with two levels 'nearby' means nothing: use uniform)")
    if not (args.eval_only or args.resume):  # those take T from the checkpoint and check then
        check_sample_steps(args)
    if args.score_samples:
        try:
            import score
        except ImportError:
            fail("--score-samples needs score.py, this project's sample scorer, beside this script")
        score.check_classifier(args.classifier, args.data_dir)


def check_sample_steps(args):
    if args.sample_steps is not None and args.sample_steps > args.timesteps:
        fail(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}")


def run_description(args, net, n_train, steps_per_epoch, total_steps, device):
    """The first log line: the model, the data and the run length, the hardware."""
    data = "binarized digits" if args.levels == 2 else f"{args.levels} grey levels"
    return (f"discrete_diffusion: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters ({args.block}), "
            f"{args.transition} transitions, K={args.levels} ({data}), T={args.timesteps}, "
            f"lambda={args.hybrid_coeff:g} "
            f"| {n_train} train images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps "
            f"| device {device.type}, compile={args.compile}, amp={args.amp}"
            + (f" | at the end: {args.score_samples} samples scored" if args.score_samples else ""))


def finish(args, device, ema_fn, sched, test_x, meter, step, steps_per_epoch, wall, train_seconds, sample_speed,
           n_params):
    """The end of a run: held-out metrics of the EMA weights, pictures, metrics.json, a summary line."""
    images_per_sec = meter.images_per_sec(step * args.batch_size, wall)
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch,
               "train_loss": meter.last.get("loss", math.nan), "train_bound": meter.last.get("bound", math.nan),
               "train_images_per_sec": images_per_sec, "sample_images_per_sec": sample_speed, "wall_time_s": wall,
               "train_seconds": train_seconds, "device": describe(device), "parameters": n_params}
    metrics.update(evaluate(ema_fn, sched, test_x, args, device))
    write_pictures(ema_fn, sched, test_x, args, device)
    if args.score_samples:
        metrics["score"] = score_run(ema_fn, sched, args, device, sample_speed)
    metrics["peak_memory_mb"] = peak_memory_mb(device)
    write_json(metrics, os.path.join(args.out_dir, "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | train loss {metrics['train_loss']:.3f} | test bound "
        + (f"{metrics['test_neg_elbo']:.2f} nats per digit ({metrics['test_bpd']:.4f} bits/dim)"
           if "test_bpd" in metrics
           else f"estimate {metrics['test_bound_estimate']:.2f} nats per digit (one step per digit)")
        + (f" | FD {metrics['score']['fd']:.2f} (N={args.score_samples})" if "fd" in metrics.get("score", {}) else "")
        + f" | {images_per_sec:,.0f} train img/s | peak memory {metrics['peak_memory_mb']:.0f} MB")


def save_grid(model_fn, sched, args, device, path, on_step=None):
    """Sample a grid with a fixed generator (the same draws every epoch, so grids compare), write
    it, and return the sampling speed in images/s."""
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID)
    t0 = time.perf_counter()
    x = sample(model_fn, sched, args.num_samples, args.sample_steps, gen, on_step)
    save_image(to_pixels(x, args.levels).cpu(), path, nrow=int(math.ceil(math.sqrt(args.num_samples))))
    return args.num_samples / (time.perf_counter() - t0)


def write_pictures(model_fn, sched, test_x, args, device, prefix=""):
    """The final grid, the corruption strip of 8 test digits and (absorbing) the unmasking order
    of the grid's samples. Returns the grid's sampling speed in images/s."""
    order, last = torch.full((args.num_samples, 28, 28), -1, device=device), {}

    def record(x, t):  # the step at which each pixel first left [MASK], and the samples
        order.masked_fill_((order < 0) & (x != args.levels), t)
        last["x"] = x
    speed = save_grid(model_fn, sched, args, device, os.path.join(args.out_dir, prefix + "samples.png"), record)
    gen = torch.Generator(device=device).manual_seed(args.seed + SEED_GRID)
    strip = corruption_strip(sched, test_categories(test_x, args, device)[:8], generator=gen)
    save_image(strip.cpu(), os.path.join(args.out_dir, prefix + "corruption.png"), nrow=10)
    written = [prefix + "samples.png", prefix + "corruption.png"]
    if args.transition == "absorbing":
        picture = unmasking_picture(order.clamp(min=0), to_pixels(last["x"], args.levels).squeeze(1), args.timesteps)
        save_image(picture.cpu(), os.path.join(args.out_dir, prefix + "unmasking.png"),
                   nrow=int(math.ceil(math.sqrt(args.num_samples))))
        written.append(prefix + "unmasking.png")
    log(f"wrote {', '.join(written)} in {args.out_dir}")
    return speed


def score_run(model_fn, sched, args, device, sample_speed=None):
    """--score-samples N: N samples from the EMA weights, as grey values in [0, 1], scored by score.py."""
    import score
    steps = args.sample_steps or args.timesteps
    cost = f"ancestral, {steps} network calls per sample" + (
        f"; about {args.score_samples / sample_speed / 60:.1f} min at the grid's speed" if sample_speed else "")

    def draw(n, gen):
        return to_pixels(sample(model_fn, sched, n, args.sample_steps, gen), args.levels)
    return score.draw_and_score(draw, args.score_samples, device, cost, args.classifier, args.data_dir, args.seed)


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
