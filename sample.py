"""
sample.py: draw pictures and sample arrays from a checkpoint of any of the project's models.

A checkpoint says what it is: `kind` ("ddpm", "vae", "vae_no_encoder") and `config` (the
training command's flags). This script reads both, rebuilds the network with that script's
own `build_model`, loads the weights as data (`weights_only=True`: no code in a checkpoint
ever runs), and draws. Sampling is what each tutorial file explains; here it is only called.

    python sample.py --ckpt out/ddpm/ckpt.pt                                    # 64 samples -> out/ddpm/samples.png
    python sample.py --ckpt out/ddpm/ckpt.pt --sampler ddim --sample-steps 20 --trajectory
    python sample.py --ckpt out/ddpm/ckpt.pt --n 10000 --save-array samples.npz   # for other tools
    python sample.py --ckpt out/vae/ckpt.pt --interpolate --reconstruct --data-dir ../shared/mnist

Writes the grid to --out (default: samples.png beside the checkpoint) and, on request, the raw
samples as an .npz (key "samples": N x 1 x 28 x 28 float32 in [0, 1]), a trajectory strip
(x_t from noise to digit, DDPM), an interpolation and reconstructions (VAE). The same --seed
gives the same images. Prints the time and images/s of every drawing.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
from torchvision.utils import save_image

import ddpm
import vae
import vae_no_encoder

PROG = "sample.py"
GRID_MAX = 1024  # a grid shows at most this many images (an .npz holds all of them)

# The script behind each kind of checkpoint: its build_model, CKPT_VERSION and sampling code.
KINDS = {"ddpm": ddpm, "vae": vae, "vae_no_encoder": vae_no_encoder}


def fail(message):
    """Stop with one clear line on stderr (bad input is not a traceback)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# Loading: any checkpoint, checked before anything is built
# ---------------------------------------------------------------------------------------

def load_any_checkpoint(path):
    """The checkpoint dict, after checking it is one of ours and not from a newer script."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        fail(f"{path} is not a checkpoint of this project (no 'kind' and 'config')")
    if ckpt["kind"] not in KINDS:
        fail(f"{path} has unknown kind {ckpt['kind']!r} (known: {', '.join(KINDS)})")
    script = KINDS[ckpt["kind"]]
    if ckpt.get("version", 0) > script.CKPT_VERSION:
        fail(f"{path} has checkpoint format {ckpt['version']}, newer than {ckpt['kind']}.py's "
             f"{script.CKPT_VERSION}: update the scripts")
    return ckpt


def load_network(ckpt, device, raw_weights=False):
    """The network of the checkpoint in eval mode. DDPM: the EMA weights unless raw_weights."""
    script = KINDS[ckpt["kind"]]
    net = script.build_model(ckpt["config"])
    use_ema = ckpt["kind"] == "ddpm" and not raw_weights
    net.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return net.to(device).eval()


def batches(n, size):
    """Sizes of the batches that make up n samples."""
    return [min(size, n - i) for i in range(0, n, size)]


def draw_all(draw_batch, n, batch_size, device):
    """Call draw_batch(b) -> (b, 1, 28, 28) in [0, 1] for each batch; gather on the host, so
    device memory stays flat however large n is. Returns (N,1,28,28) float32 and images/s."""
    out = np.empty((n, 1, 28, 28), dtype=np.float32)
    t0 = time.perf_counter()
    i = 0
    for b in batches(n, batch_size):
        out[i:i + b] = draw_batch(b).float().clamp(0, 1).cpu().numpy()
        i += b
    seconds = time.perf_counter() - t0
    return out, n / seconds, seconds


# ---------------------------------------------------------------------------------------
# Each kind: how to draw samples (the math lives in the model's own file)
# ---------------------------------------------------------------------------------------

def ddpm_drawer(ckpt, net, args, device, gen):
    cfg = ckpt["config"]
    sched = ddpm.make_schedule(cfg["schedule"], cfg["timesteps"], device)
    model_fn = ddpm.make_model_fn(torch.compile(net) if args.compile else net, device, args.amp)

    def draw(b, trajectory=0):
        x, kept = ddpm.sample(model_fn, sched, b, cfg["pred"], device, args.sampler, args.sample_steps,
                              args.eta, generator=gen, trajectory=trajectory)
        return ((x + 1) / 2, [(k + 1) / 2 for k in kept]) if trajectory else (x + 1) / 2

    return draw


def vae_drawer(ckpt, net, args, device, gen):
    encode, decode = vae.make_model_fns(net, device, args.amp, args.compile)

    def draw(b):
        z = torch.randn((b, net.latent_dim), device=device, generator=gen)  # z ~ p(z) = N(0, I)
        return net.mean(decode(z))  # decoder means: for Bernoulli the probabilities, not binary draws

    return draw


def vae_no_encoder_drawer(ckpt, net, args, device, gen):
    model_fn = vae_no_encoder.make_model_fn(torch.compile(net) if args.compile else net, device, args.amp)
    prior = args.prior or ckpt["config"].get("prior", "fitted")

    def draw(b):
        x, _ = vae_no_encoder.generate(model_fn, net, b, prior, generator=gen)  # z ~ prior, decoded once
        return (x + 1) / 2

    return draw


DRAWERS = {"ddpm": ddpm_drawer, "vae": vae_drawer, "vae_no_encoder": vae_no_encoder_drawer}


# ---------------------------------------------------------------------------------------
# Extra pictures
# ---------------------------------------------------------------------------------------

def write_trajectory(draw, args, path):
    """A strip per sample: x_t at evenly spaced steps of the sampler, noise on the left."""
    rows = 8
    with torch.no_grad():
        _, kept = draw(rows, trajectory=10)  # up to 10 columns (fewer if the sampler has fewer steps)
    columns = len(kept)
    strip = torch.stack(kept, dim=1).reshape(rows * columns, 1, 28, 28)  # (rows, columns) in row order
    save_image(strip.clamp(0, 1).cpu(), path, nrow=columns)
    log(f"wrote {path} ({rows} samples x {columns} steps of {args.sampler})")


def vae_pictures(net, args, device, gen, out_stem):
    """Interpolation (between test digits with --data-dir, else between random latents) and
    reconstructions (needs --data-dir) of a VAE checkpoint."""
    encode, decode = vae.make_model_fns(net, device, args.amp)
    test = None
    if args.data_dir is not None:
        images, _ = vae.load_mnist(args.data_dir, train=False, device=device)
        cfg = args._config
        test = vae.to_model_data(images[:64], cfg["likelihood"], cfg["binarize"], generator=gen)
    with torch.no_grad():
        if args.interpolate:
            path = out_stem + "_interpolation.png"
            if test is not None:
                vae.save_interpolation(net, encode, decode, test, path)
                what = "test digits"
            else:
                pairs, steps = 8, 10
                z = torch.randn((2, pairs, 1, net.latent_dim), device=device, generator=gen)
                a = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
                line = (1 - a) * z[0] + a * z[1]  # (pairs, steps, L)
                save_image(net.mean(decode(line.reshape(pairs * steps, -1))).cpu(), path, nrow=steps)
                what = "random latents"
            log(f"wrote {path} (interpolation between {what})")
        if args.reconstruct:
            path = out_stem + "_reconstructions.png"
            vae.save_reconstructions(net, encode, decode, test, path)
            log(f"wrote {path} (test inputs over reconstructions)")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def make_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Draw samples from a ddpm, vae or vae_no_encoder checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by ddpm.py, vae.py or vae_no_encoder.py")
    p.add_argument("--n", type=ddpm.positive_int, default=64, help="number of samples")
    p.add_argument("--nrow", type=ddpm.positive_int, default=None, help="images per grid row (default: a square)")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--out", default=None, help="grid PNG (default: samples.png beside the checkpoint)")
    p.add_argument("--save-array", default=None, metavar="PATH.npz", help="also save all samples as an .npz")
    p.add_argument("--batch-size", type=ddpm.positive_int, default=1000, help="samples drawn at once")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (default: on for CUDA only)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the network (default: on for CUDA only)")
    g = p.add_argument_group("ddpm only")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="ancestral (default) or DDIM")
    g.add_argument("--sample-steps", type=ddpm.positive_int, default=None, help="DDIM steps (default 50)")
    g.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic (default), 1 DDPM-like")
    g.add_argument("--trajectory", action="store_true", help="also write a strip of x_t from noise to digit")
    g.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    g = p.add_argument_group("vae only")
    g.add_argument("--interpolate", action="store_true",
                   help="also write an interpolation (between test digits with --data-dir, else random latents)")
    g.add_argument("--reconstruct", action="store_true", help="also write reconstructions of test digits (needs --data-dir)")
    g.add_argument("--data-dir", default=None, help="MNIST, for --interpolate and --reconstruct")
    g = p.add_argument_group("vae_no_encoder only")
    g.add_argument("--prior", choices=["standard", "fitted"], default=None,
                   help="the prior z is drawn from (default: the one it was trained with)")
    return p


# Which flags apply to which kind: a flag given for another kind is an error, not ignored.
ONLY_FOR = {"sampler": "ddpm", "sample_steps": "ddpm", "eta": "ddpm", "trajectory": "ddpm", "raw_weights": "ddpm",
            "interpolate": "vae", "reconstruct": "vae", "data_dir": "vae", "prior": "vae_no_encoder"}


def check_flags(args, kind):
    for key, owner in ONLY_FOR.items():
        if owner != kind and getattr(args, key) not in (None, False):
            fail(f"--{key.replace('_', '-')} applies to {owner} checkpoints, and this one is {kind}")
    if kind == "ddpm":
        T = args._config["timesteps"]
        args.sampler = args.sampler or "ddpm"
        args.eta = 0.0 if args.eta is None else args.eta
        if args.sampler == "ddpm" and (args.sample_steps is not None or args.eta):
            fail("--sample-steps and --eta apply to --sampler ddim (ancestral sampling uses all T steps)")
        if args.sample_steps is not None and args.sample_steps > T:
            fail(f"--sample-steps {args.sample_steps} is more than the model's T = {T}")
        if args.eta < 0:
            fail(f"--eta must be >= 0, got {args.eta}")
    if kind == "vae" and args.reconstruct and args.data_dir is None:
        fail("--reconstruct needs --data-dir (the test digits to reconstruct)")


def main(argv=None):
    parser = make_parser()
    parser.error = fail
    args = parser.parse_args(argv)
    ckpt = load_any_checkpoint(args.ckpt)
    kind = ckpt["kind"]
    args._config = ckpt["config"]
    check_flags(args, kind)
    if args.save_array is not None and not args.save_array.endswith(".npz"):
        fail(f"--save-array writes an .npz file, got {args.save_array!r}")

    device = ddpm.setup(args)  # device, compile/amp defaults (on for CUDA only), TF32
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    net = load_network(ckpt, device, args.raw_weights)
    draw = DRAWERS[kind](ckpt, net, args, device, gen)
    how = f" ({args.sampler}{f', {args.sample_steps or 50} steps, eta {args.eta}' if args.sampler == 'ddim' else ''})" \
        if kind == "ddpm" else ""
    log(f"{kind} checkpoint {args.ckpt} (step {ckpt.get('step')}) on {device.type}, compile={args.compile}, "
        f"amp={args.amp}: drawing {args.n} samples{how}")

    with torch.no_grad():
        samples, speed, seconds = draw_all(draw, args.n, args.batch_size, device)
    log(f"drew {args.n} samples in {seconds:.2f}s ({speed:,.0f} images/s)" if speed >= 100 else
        f"drew {args.n} samples in {seconds:.2f}s ({speed:.3g} images/s)")

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    shown = torch.from_numpy(samples[:GRID_MAX])
    save_image(shown, out, nrow=args.nrow or int(math.ceil(math.sqrt(len(shown)))))
    log(f"wrote {out} ({len(shown)} images{'' if args.n <= GRID_MAX else f'; all {args.n} are in the array'})")
    if args.save_array:
        np.savez_compressed(args.save_array, samples=samples)
        log(f"wrote {args.save_array} (samples: {samples.shape} float32 in [0, 1])")

    stem = os.path.splitext(out)[0]
    if kind == "ddpm" and args.trajectory:
        write_trajectory(draw, args, stem + "_trajectory.png")
    if kind == "vae" and (args.interpolate or args.reconstruct):
        vae_pictures(net, args, device, gen, stem)


if __name__ == "__main__":
    main()
