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

# The script behind each kind of checkpoint: its build_model, setup, CKPT_VERSION and sampling code.
KINDS = {"ddpm": ddpm, "vae": vae, "vae_no_encoder": vae_no_encoder}
GRID_MAX = 1024  # a grid shows at most this many images (an .npz holds all of them)


def make_parser():
    """The knobs. `python sample.py --help` lists them with their defaults."""
    p = argparse.ArgumentParser(description="Draw samples from a ddpm, vae or vae_no_encoder checkpoint.",
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


# ---------------------------------------------------------------------------------------
# 1. Loading: any checkpoint, checked before anything is built
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
    net = KINDS[ckpt["kind"]].build_model(ckpt["config"])
    use_ema = ckpt["kind"] == "ddpm" and not raw_weights
    net.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------
# 2. Each kind: a drawer, draw(b) -> b images in [0, 1] (the math lives in the model's file)
# ---------------------------------------------------------------------------------------

def ddpm_drawer(config, net, args, device, gen):
    sched = ddpm.make_schedule(config["schedule"], config["timesteps"], device)
    model_fn = ddpm.make_model_fn(net, device, args.amp, args.compile)

    def draw(b, on_step=None):  # on_step(x) after every sampler step, x in [-1, 1]
        x = ddpm.sample(model_fn, sched, b, config["pred"], args.sampler, args.sample_steps, args.eta,
                        generator=gen, on_step=on_step)
        return (x + 1) / 2
    return draw


def vae_drawer(config, net, args, device, gen):
    decode = vae.make_model_fn(net.decode, device, args.amp, args.compile)

    def draw(b):
        z = torch.randn((b, net.latent_dim), device=device, generator=gen)  # z ~ p(z) = N(0, I)
        return net.mean(decode(z))  # decoder means: for Bernoulli the probabilities, not binary draws
    return draw


def vae_no_encoder_drawer(config, net, args, device, gen):
    model_fn = vae_no_encoder.make_model_fn(net, device, args.amp, args.compile)
    prior = args.prior or config.get("prior", "fitted")

    def draw(b):
        x, _ = vae_no_encoder.generate(model_fn, net, b, prior, generator=gen)  # z ~ prior, decoded once
        return (x + 1) / 2
    return draw


DRAWERS = {"ddpm": ddpm_drawer, "vae": vae_drawer, "vae_no_encoder": vae_no_encoder_drawer}


# ---------------------------------------------------------------------------------------
# 3. Extra pictures, and main
# ---------------------------------------------------------------------------------------

def write_trajectory(draw, args, path, rows=8, columns=10):
    """A strip per sample: x_t at evenly spaced steps of the sampler, from noise to the digit."""
    xs = []
    draw(rows, on_step=xs.append)  # every step's x (T of them for ddpm, the grid's for ddim)
    keep = sorted({int(round(v)) for v in np.linspace(0, len(xs) - 1, columns)})  # fewer if fewer steps
    strip = torch.stack([(xs[i] + 1) / 2 for i in keep], dim=1)  # (rows, columns, 1, 28, 28)
    save_image(strip.reshape(-1, 1, 28, 28).clamp(0, 1).cpu(), path, nrow=len(keep))
    log(f"wrote {path} ({rows} samples x {len(keep)} steps of {args.sampler})")


def vae_pictures(net, config, args, device, gen, out_stem):
    """Interpolation (of test digits with --data-dir, else random latents) and reconstructions."""
    test = labels = None
    if args.data_dir is not None:
        images, labels = vae.load_mnist(args.data_dir, train=False, device=device)
        test, labels = vae.to_model_data(images[:64], config["likelihood"], config["binarize"], generator=gen), labels[:64]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        if args.interpolate:
            path = out_stem + "_interpolation.png"
            if test is not None:
                vae.save_interpolation(net, test, path)
            else:  # the same walk as vae.save_interpolation, between 8 pairs of z ~ N(0, I), in 10 steps
                z = torch.randn((2, 8, 1, net.latent_dim), device=device, generator=gen)
                a = torch.linspace(0, 1, 10, device=device).view(1, 10, 1)
                line = (1 - a) * z[0] + a * z[1]  # (8, 10, L)
                save_image(net.mean(net.decode(line.reshape(80, -1))).cpu(), path, nrow=10)
            log(f"wrote {path} (interpolation between {'random latents' if test is None else 'test digits'})")
        if args.reconstruct:
            path = out_stem + "_reconstructions.png"
            vae.save_reconstructions(net, test, labels, path)
            log(f"wrote {path} (test inputs over reconstructions)")


@torch.no_grad()  # nothing here trains
def main(argv=None):
    args = parse_args(argv)
    ckpt = load_any_checkpoint(args.ckpt)
    kind, config = ckpt["kind"], ckpt["config"]
    check_flags(args, ckpt)
    out = check_outputs(args)

    device = KINDS[kind].setup(args)  # the checkpoint's own script: device, compile/amp defaults
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    net = load_network(ckpt, device, args.raw_weights)
    draw = DRAWERS[kind](config, net, args, device, gen)
    how = f" ({args.sampler}{f', {args.sample_steps or 50} steps, eta {args.eta}' if args.sampler == 'ddim' else ''})" \
        if kind == "ddpm" else ""
    log(f"{kind} checkpoint {args.ckpt} (step {ckpt.get('step')}) on {device.type}, compile={args.compile}, "
        f"amp={args.amp}: drawing {args.n} samples{how}")

    samples = np.empty((args.n, 1, 28, 28), dtype=np.float32)  # gathered on the host: device memory stays flat
    t0 = time.perf_counter()
    for i in range(0, args.n, args.batch_size):
        samples[i:i + args.batch_size] = draw(min(args.batch_size, args.n - i)).float().clamp(0, 1).cpu().numpy()
    seconds = time.perf_counter() - t0
    speed = args.n / seconds
    log(f"drew {args.n} samples in {seconds:.2f}s ({f'{speed:,.0f}' if speed >= 100 else f'{speed:.3g}'} images/s)")
    shown = torch.from_numpy(samples[:GRID_MAX])
    save_image(shown, out, nrow=args.nrow or int(math.ceil(math.sqrt(len(shown)))))
    log(f"wrote {out} ({len(shown)} images{'' if args.n <= GRID_MAX else f'; all {args.n} are in the array'})")
    if args.save_array:
        np.savez_compressed(args.save_array, samples=samples)
        log(f"wrote {args.save_array} (samples: {samples.shape} float32 in [0, 1])")

    stem = os.path.splitext(out)[0]
    if args.trajectory:
        write_trajectory(draw, args, stem + "_trajectory.png")
    if args.interpolate or args.reconstruct:
        vae_pictures(net, config, args, device, gen, stem)


# =======================================================================================
# Appendix: plumbing. Nothing below this line is about the model.
# =======================================================================================
# The command line and its checks (all made before anything is drawn), and the log.


def parse_args(argv=None):
    parser = make_parser()
    parser.prog, parser.error = os.path.basename(__file__), fail  # argparse's own errors as one line too
    return parser.parse_args(argv)


def check_flags(args, ckpt):
    """Flags for another kind of checkpoint, and the ones no argparse type can check alone."""
    kind = ckpt["kind"]
    for key, owner in ONLY_FOR.items():
        if owner != kind and getattr(args, key) not in (None, False):
            fail(f"--{key.replace('_', '-')} applies to {owner} checkpoints, and this one is {kind}")
    if kind == "ddpm":
        T = ckpt["config"]["timesteps"]
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
    if args.save_array is not None and not args.save_array.endswith(".npz"):
        fail(f"--save-array writes an .npz file, got {args.save_array!r}")


def check_outputs(args):
    """The grid's path, once both outputs are known writable: before minutes of sampling, not after."""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    for flag, path in (("--out", out), ("--save-array", args.save_array)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            fail(f"{flag} {path} is a folder: give a file name")
        if not os.path.isdir(folder):
            fail(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            fail(f"{flag} {path}: the folder {folder} is not writable")
    return out


def fail(message):
    """Stop with one clear line on stderr: bad input is not a traceback."""
    print(f"{os.path.basename(__file__)}: error: {message}", file=sys.stderr)
    sys.exit(2)


def log(msg):
    print(msg, flush=True)


if __name__ == "__main__":
    main()
