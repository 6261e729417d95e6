"""
score.py: how good are generated digits? Scores on a small CNN classifier that knows MNIST.

The scores of the papers use an ImageNet Inception network, which knows nothing of digits.
Here the same formulas run on a small CNN trained on MNIST (trained by this script), so the
numbers are for comparing models of this project with each other, never with published FIDs.
For N samples x (N x 1 x 28 x 28 in [0, 1]) and real test digits r:

    FD         Frechet distance between Gaussians fitted to the classifier's penultimate
               features phi(x) and phi(r) (Heusel et al. 2017, the "FID" formula):
                   |mu_x - mu_r|^2 + tr(S_x + S_r - 2 (S_x^1/2 S_r S_x^1/2)^1/2)
               0 for identical distributions; lower is better. Biased upward at small N:
               compare only at equal N (both sets have N digits by default).
    IS         Inception score on this classifier (Salimans et al. 2016):
                   exp(E_x KL(p(y|x) || p(y))),  p(y) = E_x p(y|x)
               1 (every sample looks alike, or unrecognisable) .. 10 (each sample a confident
               digit and the ten classes equally often). With it: the class histogram, its
               entropy in nats (ln 10 = 2.303 for balanced classes) and the mean max confidence.
    precision  fraction of samples inside the real manifold: within the k-NN radius of some
               real digit's features (Kynkaanniemi et al. 2019, k = 3). Low: unrealistic digits.
    recall     fraction of real digits inside the samples' manifold. Low: missing modes.
    accuracy   if the .npz has "labels" (the classes asked for): how often the classifier agrees.

Run:
    python score.py --train-classifier --data-dir ../shared/mnist   # once: out/classifier/ckpt.pt
    python score.py samples.npz --data-dir ../shared/mnist --json scores.json
    python score.py --reference --data-dir ../shared/mnist         # real digits, blurred, noisy...

samples.npz is what `python sample.py --save-array samples.npz` writes: key "samples"
(N x 1 x 28 x 28 float32 in [0, 1]) and optionally "labels" (N ints, the intended classes).
A PNG grid that torchvision's save_image wrote (every samples_*.png here) scores too, at the
8-bit precision of the PNG; grids are small, and FD wants N >= 1,000.
The training scripts' --score-samples N calls check_classifier() before training and
draw_and_score() after it (section 4).
Writes: --classifier (ckpt.pt) and metrics.json beside it when training; --json when scoring.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def make_parser():
    """The knobs: every default on one screen. `python score.py --help` lists them."""
    p = argparse.ArgumentParser(description="Score generated MNIST digits (FD, IS, precision/recall, accuracy) "
                                "on a small CNN classifier, or train that classifier.",
                                formatter_class=HelpFormatter)
    p.add_argument("samples", nargs="?", default=None, metavar="SAMPLES.npz",
                   help='samples to score: an .npz with key "samples" (N x 1 x 28 x 28 in [0, 1]) and '
                   'optional "labels", or a PNG grid as save_image writes it (28 x 28 tiles, 2-pixel padding)')
    g = p.add_argument_group("what to do (one of: SAMPLES.npz, --train-classifier, --reference)")
    g.add_argument("--train-classifier", action="store_true", help="train the classifier and save it to --classifier")
    g.add_argument("--reference", action="store_true",
                   help="score real and corrupted real digits: the table to read other scores against")
    g.add_argument("--classifier", default="out/classifier/ckpt.pt", help="the classifier checkpoint")
    g.add_argument("--data-dir", default="./data", help="where MNIST is (or is downloaded to)")
    g.add_argument("--json", default=None, metavar="OUT.json", help="also write the scores here")

    g = p.add_argument_group("scoring")
    g.add_argument("--k", type=positive_int, default=3, help="neighbourhood size of the precision/recall manifolds")
    g.add_argument("--n-real", type=positive_int, default=None,
                   help="real test digits to compare with (default: as many as samples, up to the test split)")
    g.add_argument("--score-batch-size", type=positive_int, default=500, help="images per classifier call")

    g = p.add_argument_group("classifier training")
    g.add_argument("--epochs", type=positive_int, default=10, help="passes over the training set")
    g.add_argument("--batch-size", type=positive_int, default=128, help="images per optimizer step")
    g.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate, cosine-decayed to 0")
    g.add_argument("--max-shift", type=float, default=2.0, help="augmentation: random shift up to this many pixels")
    g.add_argument("--max-rotate", type=float, default=10.0, help="augmentation: random rotation up to this many degrees")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order, every draw")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the classifier for training: for long runs (a cold compile costs about a minute)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training (default: on CUDA only; scoring is always fp32)")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps between log lines")
    return p


# ---------------------------------------------------------------------------------------
# 0. The classifier
# ---------------------------------------------------------------------------------------
# A small CNN: three 3x3 conv blocks (28 -> 14 -> 7), a 128-feature fully connected layer
# (the "penultimate features" every score but IS and accuracy is computed on), a 10-way head.
# BatchNorm makes a few epochs enough; it means eval() mode matters when scoring.

class Classifier(nn.Module):
    def __init__(self, features=128):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.body = nn.Sequential(
            *block(1, 16), nn.MaxPool2d(2),       # (B, 16, 14, 14)
            *block(16, 32), nn.MaxPool2d(2),      # (B, 32, 7, 7)
            *block(32, 64), nn.Flatten(),         # (B, 64 * 7 * 7)
            nn.Linear(64 * 7 * 7, features), nn.ReLU())  # (B, features): phi(x)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, 10))

    def features(self, x):
        """x: (B, 1, 28, 28) in [0, 1] -> phi(x): (B, features)."""
        return self.body((x - 0.5) / 0.5)

    def forward(self, x):
        """x: (B, 1, 28, 28) in [0, 1] -> logits (B, 10)."""
        return self.head(self.features(x))


def augment(x, max_shift, max_rotate, generator=None):
    """Random small rotations and shifts of a batch, on its device, in one grid_sample.

    affine_grid maps output pixel coordinates (in [-1, 1], 28 pixels wide, so one pixel is
    2/28) through theta = [[cos a, -sin a, tx], [sin a, cos a, ty]] to the input coordinates
    to read; outside the image it reads 0, the background."""
    b = x.shape[0]
    u = torch.rand(b, 3, device=x.device, generator=generator) * 2 - 1  # uniform in [-1, 1]
    a = u[:, 0] * math.radians(max_rotate)
    shift = u[:, 1:] * max_shift * 2 / x.shape[-1]
    theta = torch.stack([torch.stack([a.cos(), -a.sin(), shift[:, 0]], 1),
                         torch.stack([a.sin(), a.cos(), shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_model_range(images_u8):
    """The classifier's data convention: uint8 (B, 28, 28) in 0..255 -> float (B, 1, 28, 28) in
    [0, 1], the range every script's samples are scored in."""
    return images_u8.unsqueeze(1).float() / 255


# ---------------------------------------------------------------------------------------
# 1. The scores
# ---------------------------------------------------------------------------------------
# All on features or class probabilities already computed; float64 where matrices meet.

def gaussian_stats(feats):
    """Mean and (unbiased, N - 1) covariance of features (N, D), in float64."""
    f = feats.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def sqrtm_psd(a):
    """The symmetric PSD square root of a symmetric matrix: V diag(sqrt(lambda)) V^T from its
    eigendecomposition. Covariances of N < D points are singular and round-off makes some
    eigenvalues slightly negative: they are clamped to 0 (they are 0)."""
    lam, v = torch.linalg.eigh(((a + a.T) / 2).double())
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """Frechet (2-Wasserstein) distance between N(mu1, s1) and N(mu2, s2) (Dowson & Landau
    1982; Heusel et al. 2017):  |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2).

    The symmetric form s1^1/2 s2 s1^1/2 (same eigenvalues as s1 s2) is PSD, so its root's trace
    is the sum of the square roots of its eigenvalues: no general (non-symmetric) sqrtm needed."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r = sqrtm_psd(s1)
    m = r @ s2 @ r
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross).item()


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))) with p(y) = E_x p(y|x) (Salimans et al. 2016), probs (N, C).

    Equal to exp(H(p(y)) - E_x H(p(y|x))): high when the marginal is spread over classes and
    each prediction is confident. xlogy makes 0 log 0 = 0 for one-hot predictions."""
    p = probs.double()
    py = p.mean(0, keepdim=True)
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, py)).sum(1)
    return kl.mean().exp().item()


def knn_radii(feats, k, chunk=1024):
    """Distance from each point to its k-th nearest other point (the k + 1-th smallest
    distance, the first being the point itself at 0), as in Kynkaanniemi et al.'s code.
    cdist computes |a|^2 + |b|^2 - 2ab for large inputs: a self-distance comes out ~1e-3
    rather than 0, far below any radius, so it is still the smallest."""
    return torch.cat([torch.cdist(feats[i:i + chunk], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), chunk)])


def manifold_coverage(points, ref, ref_radii, chunk=1024):
    """Fraction of points inside the union of balls B(ref_j, radius_j), boundary included."""
    inside = [(torch.cdist(points[i:i + chunk], ref) <= ref_radii).any(1) for i in range(0, len(points), chunk)]
    return torch.cat(inside).float().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019), features (N, D) and (M, D):
    precision = fraction of fake inside the k-NN manifold of real, recall = the reverse."""
    real, fake = real.float(), fake.float()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


@torch.no_grad()
def classify(net, x, batch_size):
    """Features (N, D) and class probabilities (N, 10) of images (N, 1, 28, 28) in [0, 1],
    in fp32 without autocast (bf16 would move the features, and so the scores)."""
    net.eval()
    device = next(net.parameters()).device
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f = net.features(x[i:i + batch_size].to(device).float())
        feats.append(f)
        probs.append(net.head(f).softmax(1))
    return torch.cat(feats).cpu(), torch.cat(probs).cpu()


def scores(feats, probs, real_feats, k, labels=None):
    """Every score of samples (features, probabilities) against real features, as a dict."""
    mu1, s1 = gaussian_stats(feats)
    mu2, s2 = gaussian_stats(real_feats)
    precision, recall = precision_recall(real_feats, feats, k)
    hist = torch.bincount(probs.argmax(1), minlength=10)
    freq = hist.double() / hist.sum()
    entropy = 0.0 - torch.special.xlogy(freq, freq).sum().item()  # 0.0 - x: one class gives 0, not -0
    out = {"n": len(feats), "n_real": len(real_feats), "fd": frechet_distance(mu1, s1, mu2, s2),
           "is": inception_score(probs), "precision": precision, "recall": recall, "k": k,
           "class_histogram": hist.tolist(), "class_entropy_nats": entropy,
           "mean_max_confidence": probs.max(1).values.mean().item()}
    if labels is not None:
        out["accuracy"] = (probs.argmax(1) == labels).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------
# 2. Training the classifier
# ---------------------------------------------------------------------------------------

def train_classifier(args):
    device = setup(args)
    if os.path.exists(args.classifier):
        fail(f"{args.classifier} exists: delete it to retrain, or pass --classifier NEW_PATH")
    torch.manual_seed(args.seed)
    train_x, train_y = load_mnist(args.data_dir, train=True, device=device)
    test_x, test_y = load_mnist(args.data_dir, train=False, device=device)
    steps_per_epoch, total_steps = run_length(args, len(train_x))
    make_out_dir(os.path.dirname(args.classifier) or ".")

    net = Classifier().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, fused=fused_adam_ok(device))
    train_fn = make_model_fn(net, device, args.amp, args.compile)
    log(f"classifier: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters | {len(train_x)} train "
        f"images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, {total_steps} steps | device "
        f"{device.type}, compile={args.compile}, amp={args.amp}")
    step, test_acc, t_start = 0, math.nan, time.perf_counter()
    meter = Meter(0, total_steps, steps_per_epoch, args.batch_size, args.log_every, device)
    net.train()
    while step < total_steps:
        for images, y in epoch_batches((train_x, train_y), step, steps_per_epoch, args.batch_size, args.seed):
            x = augment(to_model_range(images), args.max_shift, args.max_rotate)
            for group in opt.param_groups:  # cosine decay of the learning rate to 0 over the run
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(train_fn(x), y, reduction="none")
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
            step += 1
            meter.add("loss", loss)
            meter.tick(step)
            if step >= total_steps:
                break
        with meter.paused():  # held-out accuracy each epoch, then the checkpoint
            test_acc = accuracy(net, test_x, test_y, args.score_batch_size)
            net.train()
            log(f"epoch {step / steps_per_epoch:.2f} | test accuracy {test_acc:.4f}")
            save_checkpoint(args.classifier, "classifier", args, step, step // steps_per_epoch, device,
                            model=net, optimizer=opt)

    wall = time.perf_counter() - t_start
    metrics = {"config": vars(args), "step": step, "epochs_done": step / steps_per_epoch,
               "train_loss": meter.last.get("loss", math.nan), "test_accuracy": test_acc,
               "train_images_per_sec": meter.images_per_sec(step * args.batch_size, wall), "wall_time_s": wall,
               "train_seconds": meter.training_seconds(), "device": describe(device),
               "parameters": sum(p.numel() for p in net.parameters()), "peak_memory_mb": peak_memory_mb(device)}
    write_json(metrics, os.path.join(os.path.dirname(args.classifier) or ".", "metrics.json"))
    log(f"done: {step} steps in {wall / 60:.1f} min | test accuracy {test_acc:.4f} ({len(test_x)} digits) "
        f"| wrote {args.classifier}")


def accuracy(net, images_u8, labels, batch_size):
    _, probs = classify(net, to_model_range(images_u8), batch_size)
    return (probs.argmax(1) == labels.cpu()).float().mean().item()


# ---------------------------------------------------------------------------------------
# 3. Scoring samples
# ---------------------------------------------------------------------------------------

def check_classifier(path, data_dir):
    """A trained digit classifier at path, or one line that says how to train one. The training
    scripts call this before anything runs (--score-samples), so a long run cannot end without
    the score it was asked for."""
    if not os.path.isfile(path):
        fail(f"no digit classifier at {path}: train one with `python score.py --train-classifier "
             f"--data-dir {data_dir} --classifier {path}` (a few minutes on a CPU)")


def load_classifier(path, device, data_dir):
    check_classifier(path, data_dir)
    ckpt = load_checkpoint(path, "classifier")
    net = Classifier().to(device)
    net.load_state_dict(ckpt["model"])
    return net.eval()


def load_samples(path):
    """The samples (N, 1, 28, 28) float32 in [0, 1] and labels (N,) or None, checked: from an
    .npz (what sample.py --save-array writes) or a PNG grid (what save_image writes)."""
    if not os.path.isfile(path):
        fail(f"no such file: {path}")
    if path.lower().endswith(".png"):
        x, labels = load_grid(path), None
    else:
        x, labels = load_npz(path)
    problem = sample_problem(x)
    if problem:
        fail(problem)
    return x.clamp(0, 1), labels


def load_npz(path):
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        fail(f"{path} is not a readable .npz file ({type(e).__name__})")
    if "samples" not in arrays:
        fail(f'{path} has no "samples" array (keys: {", ".join(arrays) or "none"}); sample.py --save-array writes one')
    x = arrays["samples"]
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28) or not np.issubdtype(x.dtype, np.number):
        fail(f'"samples" must be numbers of shape (N, 1, 28, 28), got {x.dtype} {x.shape}')
    labels = arrays.get("labels")
    if labels is not None:
        if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9:
            fail(f'"labels" must be {len(x)} integers in 0..9, got {labels.dtype} {labels.shape}')
        labels = torch.from_numpy(labels.astype(np.int64))
    return torch.from_numpy(x.astype(np.float32)), labels


def load_grid(path, pad=2):
    """The digits of a PNG grid as torchvision's save_image draws it: 28 x 28 tiles, `pad`
    pixels of 0 around and between them, so a grid of R rows and C columns is
    (R (28 + pad) + pad) x (C (28 + pad) + pad) pixels. Empty cells at the end of the last
    row (n not a multiple of the row length) are all 0 and dropped. 8-bit PNG: k / 255."""
    from PIL import Image  # torchvision's own image library (save_image writes through it)
    try:
        with Image.open(path) as image:
            img = torch.from_numpy(np.array(image.convert("L")))
    except Exception as e:
        fail(f"{path} is not a readable PNG ({type(e).__name__})")
    h, w = img.shape
    cell = 28 + pad
    if (h - pad) % cell or (w - pad) % cell or h < cell + pad or w < cell + pad:
        fail(f"{path} is {w} x {h} pixels: not a grid of 28 x 28 digits with {pad}-pixel padding "
             f"(save_image's layout); score an .npz from sample.py --save-array instead")
    rows, cols = (h - pad) // cell, (w - pad) // cell
    tiles = (img[pad:, pad:].reshape(rows, cell, cols, cell)[:, :28, :, :28]  # drop each cell's padding
             .permute(0, 2, 1, 3).reshape(rows * cols, 1, 28, 28))
    n = len(tiles)
    while n > (rows - 1) * cols and tiles[n - 1].max() == 0:
        n -= 1
    return tiles[:n].float() / 255


def sample_problem(x):
    """What is wrong with samples x (N, 1, 28, 28) for scoring, in one line, or None."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        return f"the samples have {bad} NaN or infinite values"
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-4 or hi > 1 + 1e-4:
        return (f"samples must be in [0, 1] (sample.py writes that range), got [{lo:.3g}, {hi:.3g}]"
                + ("; for [-1, 1] images use (x + 1) / 2" if lo < 0 else ""))
    if len(x) <= 3:
        return f"need at least 4 samples for a covariance and neighbours, got {len(x)}"
    return None


def real_subset(images_u8, n, seed):
    """n digits drawn without replacement (seeded), as floats in [0, 1] on the CPU."""
    idx = torch.randperm(len(images_u8), generator=torch.Generator().manual_seed(seed))[:n]
    return to_model_range(images_u8.cpu()[idx])


def score_samples(x, classifier, data_dir, device, k=3, n_real=None, seed=0, labels=None, batch_size=500):
    """Every score of samples x (N, 1, 28, 28) in [0, 1] against n_real real test digits
    (default: as many as there are samples, up to the test split), as a dict. The training
    scripts' --score-samples calls this too."""
    net = load_classifier(classifier, device, data_dir)
    test_x, _ = load_mnist(data_dir, train=False, device="cpu")
    n_real = min(n_real or len(x), len(test_x))
    if n_real <= k:
        fail(f"--k {k} needs more than {k} real digits, got {n_real}")
    if len(x) <= k:
        fail(f"--k {k} needs more than {k} samples, got {len(x)}")
    feats, probs = classify(net, x, batch_size)
    real_feats, _ = classify(net, real_subset(test_x, n_real, seed), batch_size)
    return {"classifier": classifier, **scores(feats, probs, real_feats, k, labels)}


# ---------------------------------------------------------------------------------------
# 4. Scoring a training run: what the training scripts' --score-samples calls
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def draw_and_score(draw, n, device, cost, classifier, data_dir, seed, labels=None):
    """Draw n samples with draw(n, generator) -> (n, 1, 28, 28) in [0, 1], in batches of 256 from
    a generator seeded seed + SEED_SCORE, and score them against as many real test digits.
    Announces the cost (a text: the sampler, network calls per sample), then the time to go
    after the first batch. With labels (n intended classes) draw(n, generator, labels of the
    batch), and the scores have the classifier's accuracy on them. Diverged samples (NaN, out of
    range) are not scored: {"n", "error"}, so the rest of a run's metrics survive."""
    batch = 256
    log(f"score: drawing {n} samples ({cost}), then scoring them with {classifier}")
    gen = torch.Generator(device=device).manual_seed(seed + SEED_SCORE)
    t0, parts = time.perf_counter(), []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        images = draw(k, gen) if labels is None else draw(k, gen, labels[i:i + k])
        parts.append(images.float().clamp(0, 1).cpu())
        if i == 0 and n > batch:
            spent = time.perf_counter() - t0
            log(f"score: {batch} samples in {spent:.1f}s, about {spent * (n - batch) / batch / 60:.1f} min to go")
    seconds, x = time.perf_counter() - t0, torch.cat(parts)
    problem = sample_problem(x)
    if problem:
        log(f"score: not scored: {problem}")
        return {"n": n, "error": problem}
    result = {**score_samples(x, classifier, data_dir, device, seed=seed, labels=labels),
              "sampling": cost, "sample_seconds": seconds}
    log(f"score: FD {result['fd']:.2f} | IS {result['is']:.2f} | precision {result['precision']:.3f} | recall "
        f"{result['recall']:.3f}" + (f" | accuracy on the labels {result['accuracy']:.3f}" if labels is not None else "")
        + f" | {n} samples vs {result['n_real']} real test digits (compare FDs at equal N)")
    return result


# ---------------------------------------------------------------------------------------
# 5. The command line: scoring a file, the reference table
# ---------------------------------------------------------------------------------------

def score_file(args):
    x, labels = load_samples(args.samples)
    device = setup(args)
    result = {"samples": args.samples, **score_samples(x, args.classifier, args.data_dir, device, args.k,
                                                       args.n_real, args.seed, labels, args.score_batch_size)}
    log(f"{args.samples}: N = {result['n']} samples vs {result['n_real']} real test digits")
    log(f"  FD {result['fd']:.3f} | IS {result['is']:.3f} | precision {result['precision']:.3f} | recall "
        f"{result['recall']:.3f} (k={args.k})" + (f" | accuracy on labels {result['accuracy']:.4f}" if labels is not None else ""))
    log(f"  classes {result['class_histogram']} | entropy {result['class_entropy_nats']:.3f} nats (max {math.log(10):.3f}) "
        f"| mean max confidence {result['mean_max_confidence']:.3f}")
    log("  note: FD is biased upward at small N; compare FDs only at equal N (python score.py --reference "
        "gives real digits' FD at N = 1000 and the whole test split)")
    if args.json:
        write_out(result, args.json)


def blur(x, sigma=1.0):
    """Gaussian blur, 5x5 kernel, zero padding (the background is 0)."""
    t = torch.arange(5, dtype=torch.float32) - 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 5, 5)
    return F.conv2d(x, kernel, padding=2)


def reference(args):
    """Real test digits as the reference set, scored against real train digits (the floor:
    what a perfect model would get at that N) and against corrupted train digits."""
    device = setup(args)
    net = load_classifier(args.classifier, device, args.data_dir)
    train_x, train_y = load_mnist(args.data_dir, train=True, device="cpu")
    test_x, _ = load_mnist(args.data_dir, train=False, device="cpu")
    n_max = min(len(train_x), len(test_x))
    if n_max <= args.k:
        fail(f"--k {args.k} needs more than {args.k} digits per split, got {n_max}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    real = real_subset(train_x, n_max, args.seed + 2)
    first_half = train_x[train_y < 5]
    rows = [(f"real train digits, N={n}", real_subset(train_x, n, args.seed + 2))
            for n in sorted({min(1000, n_max), n_max})]
    rows += [("blurred (Gaussian, sigma 1)", blur(real)),
             *[(f"noise std {s}", (real + s * torch.randn(real.shape, generator=gen)).clamp(0, 1)) for s in (0.05, 0.1, 0.3)],
             ("binarized (> 0.5)", (real > 0.5).float()),
             ("only digits 0-4 (half the modes)", real_subset(first_half, min(n_max, len(first_half)), args.seed + 3))]
    table = []
    log(f"reference set: real test digits (N as in each row), classifier {args.classifier}, k={args.k}")
    log(f"{'samples':<36} {'N':>6} {'FD':>9} {'IS':>7} {'precision':>10} {'recall':>7}")
    for name, x in rows:  # each row against as many real test digits as it has samples
        real_feats, _ = classify(net, real_subset(test_x, len(x), args.seed), args.score_batch_size)
        feats, probs = classify(net, x, args.score_batch_size)
        s = {"name": name, **scores(feats, probs, real_feats, args.k)}
        table.append(s)
        log(f"{name:<36} {s['n']:>6} {s['fd']:>9.3f} {s['is']:>7.3f} {s['precision']:>10.3f} {s['recall']:>7.3f}")
    log("FD is biased upward at small N: compare a model's FD with the real-digit row at the same N")
    if args.json:
        write_out({"classifier": args.classifier, "k": args.k, "rows": table}, args.json)


def main(argv=None):
    args = parse_args(argv)
    if args.train_classifier:
        train_classifier(args)
    elif args.reference:
        reference(args)
    else:
        score_file(args)


# ---------------------------------------------------------------------------------------
# Run plumbing of this script
# ---------------------------------------------------------------------------------------

def check_args(args):
    """The checks no single argparse type can make."""
    modes = [m for m, on in (("SAMPLES.npz", args.samples is not None), ("--train-classifier", args.train_classifier),
                             ("--reference", args.reference)) if on]
    if len(modes) != 1:
        fail("give one of SAMPLES.npz, --train-classifier, --reference" + (f" (got {' and '.join(modes)})" if modes else ""))
    if args.max_shift < 0 or args.max_rotate < 0:
        fail(f"--max-shift and --max-rotate must be >= 0, got {args.max_shift} and {args.max_rotate}")


def write_out(obj, path):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_json(obj, path)
    except OSError as e:
        fail(f"cannot write --json {path}: {e.strerror or e}")
    log(f"wrote {path}")


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
