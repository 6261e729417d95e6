"""
sample.py: draw pictures and sample arrays from a checkpoint of any of the project's models.

A checkpoint says what it is: `kind` ("ddpm", "vae", "vae_no_encoder", "latent_diffusion",
"discrete_diffusion") and `config` (the training command's flags). This script reads both,
rebuilds the network with that script's own `build_model`, loads the weights as data
(`weights_only=True`: no code in a checkpoint ever runs), and draws. Sampling is what each
tutorial file explains; here it is only called.

    python sample.py --ckpt out/ddpm/ckpt.pt                                    # 64 samples -> out/ddpm/samples.png
    python sample.py --ckpt out/ddpm/ckpt.pt --sampler ddpm --trajectory          # ancestral, all T steps
    python sample.py --ckpt out/ddpm/ckpt.pt --n 10000 --save-array samples.npz   # for score.py
    python sample.py --ckpt out/vae/ckpt.pt --interpolate --reconstruct --data-dir ../shared/mnist
    python sample.py --ckpt out/ddpm_cond/ckpt.pt --per-class 8 --guidance 1      # --class-cond: a row per digit
    python sample.py --ckpt out/ddpm_cond/ckpt.pt --per-class 4 --guidance-sweep 0,1,3,5
    python sample.py --ckpt out/ddpm/ckpt.pt --inpaint bottom --data-dir ../shared/mnist --resample 5

Writes the grid to --out (default: samples.png beside the checkpoint) and, on request, the raw
samples as an .npz (key "samples": N x 1 x 28 x 28 float32 in [0, 1]), a trajectory strip
(x_t from noise to digit, DDPM), an interpolation and reconstructions (VAE). The same --seed
gives the same images. Prints the time and images/s of every drawing. A checkpoint in another
format than its script reads (one of an older version of this project) is refused in one line.
"""
import argparse
import math
import os
import time

import numpy as np
import torch

import ddpm
import discrete_diffusion
import latent_diffusion
import vae
import vae_no_encoder
from ddpm import fail, log  # the shared plumbing's one error line and log

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")  # what --out may be: PIL picks the format by it
GRID_MAX = 1024  # a grid shows at most this many images (an .npz holds all of them)


def make_parser():
    """The knobs. `python sample.py --help` lists them with their defaults."""
    p = argparse.ArgumentParser(description="Draw samples from a ddpm, vae, vae_no_encoder or latent_diffusion checkpoint.",
                                formatter_class=ddpm.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by ddpm.py, vae.py, vae_no_encoder.py or latent_diffusion.py")
    p.add_argument("--n", type=ddpm.positive_int, default=None,
                   help="number of samples (default 64); --inpaint: number of test digits (default 8)")
    p.add_argument("--nrow", type=ddpm.positive_int, default=None, help="images per grid row (default: a square)")
    p.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto", help="auto: cuda > mps > cpu")
    p.add_argument("--out", default=None, help="grid PNG (default: samples.png beside the checkpoint)")
    p.add_argument("--save-array", default=None, metavar="PATH.npz", help="also save all samples as an .npz")
    p.add_argument("--batch-size", type=ddpm.positive_int, default=1000, help="samples drawn at once")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the network (off: a cold compile costs more than it saves at these "
                        "sizes; docs/performance.md)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the network (default: on CUDA only)")
    g = p.add_argument_group("conditional checkpoints (ddpm.py and vae.py --class-cond)")
    g.add_argument("--class", dest="classes", action="append", default=None, metavar="DIGITS",
                   help="the digits to draw, e.g. --class 3 --class 7 or --class 3,7 (default: 0..9 in turn)")
    g.add_argument("--per-class", type=ddpm.positive_int, default=None,
                   help="K samples of each class, a row per class (instead of --n)")
    g.add_argument("--guidance", type=float, default=None,
                   help="ddpm: classifier-free guidance weight w (default: the training run's --guidance)")
    g.add_argument("--guidance-sweep", default=None, metavar="W,W,...",
                   help="ddpm: one picture with a block of rows per guidance weight, the same noise in each")
    g = p.add_argument_group("ddpm only (--sampler, --sample-steps, --eta, --raw-weights: latent_diffusion too)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default=None,
                   help="DDIM (default), or ancestral DDPM (all T steps)")
    g.add_argument("--sample-steps", type=ddpm.positive_int, default=None, help="DDIM steps (default 50, or T if fewer)")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM noise (default 1); 0: deterministic, one noise one digit")
    g.add_argument("--trajectory", action="store_true", help="also write a strip of x_t from noise to digit")
    g.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    g.add_argument("--inpaint", choices=["top", "bottom", "left", "right", "center"], default=None,
                   help="hide this region of test digits (--data-dir) and let the model fill it in")
    g.add_argument("--resample", type=ddpm.positive_int, default=None,
                   help="--inpaint: RePaint resampling, each step repeated this many times (default 1)")
    g.add_argument("--completions", type=ddpm.positive_int, default=None,
                   help="--inpaint: completions per digit (default 4)")
    g = p.add_argument_group("vae only")
    g.add_argument("--interpolate", action="store_true",
                   help="also write an interpolation (between test digits with --data-dir, else random latents)")
    g.add_argument("--reconstruct", action="store_true", help="also write reconstructions of test digits (needs --data-dir)")
    g.add_argument("--data-dir", default=None, help="MNIST, for --interpolate and --reconstruct (and ddpm's --inpaint)")
    g = p.add_argument_group("vae_no_encoder only")
    g.add_argument("--prior", choices=["standard", "fitted"], default=None,
                   help="the prior z is drawn from (default: the one it was trained with)")
    return p


# ---------------------------------------------------------------------------------------
# 1. Loading: any checkpoint, checked before anything is built
# ---------------------------------------------------------------------------------------

def load_any_checkpoint(path):
    """The checkpoint dict, after checking it is one of ours, in the format its script reads."""
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
    script = KINDS[ckpt["kind"]][0]
    if ckpt.get("version", 0) != script.CKPT_VERSION:
        fail(f"{path} has checkpoint format {ckpt.get('version', 0)}; {ckpt['kind']}.py reads format "
             f"{script.CKPT_VERSION}: retrain, or use the version of this project that wrote it")
    return ckpt


def load_network(ckpt, device, raw_weights=False):
    """The network of the checkpoint in eval mode. Diffusion: the EMA weights unless raw_weights."""
    net = KINDS[ckpt["kind"]][0].build_model(ckpt["config"])
    use_ema = ckpt["kind"] in DIFFUSION + ("discrete_diffusion",) and not raw_weights
    net.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    return net.to(device).eval()


# ---------------------------------------------------------------------------------------
# 2. Each kind: a drawer, draw(b) -> b images in [0, 1] (the math lives in the model's file)
# ---------------------------------------------------------------------------------------

def ddpm_drawer(ckpt, net, args, device, gen):
    config = ckpt["config"]
    sched = ddpm.make_schedule(config["schedule"], config["timesteps"], device)
    model_fn = ddpm.make_model_fn(net, device, args.amp, args.compile)

    def draw(b, y=None, on_step=None, w=None):  # on_step(x) after every sampler step, x in [-1, 1]
        fn = model_fn if y is None else ddpm.for_labels(model_fn, y, args.guidance if w is None else w, net.null_label)
        x = ddpm.sample(fn, sched, b, config["pred"], args.sampler, args.sample_steps, args.eta,
                        generator=gen, on_step=on_step)
        return (x + 1) / 2
    return draw


def vae_drawer(ckpt, net, args, device, gen):
    decode = vae.make_model_fn(net.decode, device, args.amp, args.compile)

    def draw(b, y=None):
        z = torch.randn((b, net.latent_dim), device=device, generator=gen)  # z ~ p(z) = N(0, I)
        return net.mean(decode(z, y))  # decoder means: for Bernoulli the probabilities, not binary draws
    return draw


def vae_no_encoder_drawer(ckpt, net, args, device, gen):
    model_fn = vae_no_encoder.make_model_fn(net, device, args.amp, args.compile)
    prior = args.prior or ckpt["config"]["prior"]

    def draw(b, y=None):
        x, _ = vae_no_encoder.generate(model_fn, net, b, prior, generator=gen)  # z ~ prior, decoded once
        return (x + 1) / 2
    return draw


def latent_diffusion_drawer(ckpt, net, args, device, gen):
    config = ckpt["config"]  # the VAE is the file it was trained on, or nothing is drawn
    vae_net, _ = latent_diffusion.load_vae(config["vae_ckpt"], device, ckpt["vae_sha256"])
    sched = ddpm.make_schedule(config["schedule"], config["timesteps"], device)
    model_fn = latent_diffusion.make_model_fn(net, device, args.amp, args.compile)
    how = argparse.Namespace(pred=config["pred"], sampler=args.sampler, sample_steps=args.sample_steps, eta=args.eta)

    def draw(b, y=None):  # latents from the DDPM, decoded once
        return latent_diffusion.draw_digits(model_fn, sched, vae_net, ckpt["latent_scale"], b, how, gen)
    return draw


def discrete_diffusion_drawer(ckpt, net, args, device, gen):
    config = ckpt["config"]  # ancestral sampling over all T steps; pixels are categories, shown as grey levels
    sched = discrete_diffusion.make_schedule(config["transition"], config["levels"], config["timesteps"], device)
    model_fn = discrete_diffusion.make_model_fn(net, device, args.amp, args.compile)

    def draw(b, y=None, on_step=None):  # on_step(x) after every step, x in [-1, 1] ([MASK]: 0, mid-grey)
        step = on_step and (lambda x, t: on_step(2 * discrete_diffusion.to_pixels(x, config["levels"]) - 1))
        x = discrete_diffusion.sample(model_fn, sched, b, None, gen, step)
        return discrete_diffusion.to_pixels(x, config["levels"])
    return draw


# Each kind of checkpoint: the script that wrote it (its build_model, setup and CKPT_VERSION)
# and its drawer. A new kind is a row here, a drawer above, and its flags in ONLY_FOR.
KINDS = {"ddpm": (ddpm, ddpm_drawer), "vae": (vae, vae_drawer),
         "vae_no_encoder": (vae_no_encoder, vae_no_encoder_drawer),
         "latent_diffusion": (latent_diffusion, latent_diffusion_drawer),
         "discrete_diffusion": (discrete_diffusion, discrete_diffusion_drawer)}

# Which flags apply to which kind: a flag given for another kind is an error, not ignored.
DIFFUSION = ("ddpm", "latent_diffusion")  # these keep EMA weights (--raw-weights) and have a sampler
ONLY_FOR = {"sampler": DIFFUSION, "sample_steps": DIFFUSION, "eta": DIFFUSION,
            "raw_weights": DIFFUSION + ("discrete_diffusion",), "trajectory": ("ddpm", "discrete_diffusion"),
            "guidance": ("ddpm",), "guidance_sweep": ("ddpm",), "inpaint": ("ddpm",),
            "resample": ("ddpm",), "completions": ("ddpm",), "interpolate": ("vae",), "reconstruct": ("vae",),
            "prior": ("vae_no_encoder",)}


# ---------------------------------------------------------------------------------------
# 3. Labels for conditional checkpoints, the extra pictures
# ---------------------------------------------------------------------------------------

def class_labels(args):
    """The label of each of the n samples: --per-class K: K of each class in turn (a grid row
    per class); else the classes (default 0..9) cycled over --n."""
    classes = args.classes or list(range(10))
    if args.per_class:
        return torch.tensor(classes).repeat_interleave(args.per_class)
    return torch.tensor(classes).repeat(-(-args.n // len(classes)))[:args.n]


def write_guidance_sweep(draw, args, labels, device, gen, path):
    """One block of rows per guidance weight w, the same labels and the same noise in each
    block, so the blocks differ by w alone; a blank row between blocks."""
    ws = [float(w) for w in args.guidance_sweep.split(",")]
    nrow = args.per_class or args.nrow or int(math.ceil(math.sqrt(len(labels))))
    blocks = []
    for w in ws:
        gen.manual_seed(args.seed)  # the drawer's generator: the same noise for every w
        x = torch.cat([draw(min(args.batch_size, len(labels) - i), labels[i:i + args.batch_size].to(device), w=w).cpu()
                       for i in range(0, len(labels), args.batch_size)])
        pad = (-len(x)) % nrow
        blocks += [x, torch.zeros(pad + nrow, *x.shape[1:])]  # fill the last row, then one blank row
    ddpm.save_image(torch.cat(blocks[:-1]).clamp(0, 1), path, nrow=nrow)
    log(f"wrote {path} (guidance w = {', '.join(f'{w:g}' for w in ws)}, a block of rows each)")


HIDDEN = {"top": (slice(0, 14), slice(None)), "bottom": (slice(14, 28), slice(None)),
          "left": (slice(None), slice(0, 14)), "right": (slice(None), slice(14, 28)),
          "center": (slice(7, 21), slice(7, 21))}


def write_inpainting(net, config, args, device, gen, path):
    """Each row: a test digit with --inpaint's region hidden (grey), --completions fills of it
    by the model (ddpm.inpaint), and the original."""
    images, true_labels = ddpm.load_mnist(args.data_dir, train=False, device=device)
    n, k = args.n, args.completions or 4
    x0 = ddpm.to_model_range(images[:n]).repeat_interleave(k, dim=0)   # k copies of each digit, in [-1, 1]
    known = torch.ones_like(x0)
    known[(slice(None), slice(None), *HIDDEN[args.inpaint])] = 0
    model_fn = ddpm.make_model_fn(net, device, args.amp, args.compile)
    if config["class_cond"]:  # fill as the digit's own class, or as --class
        y = torch.tensor(args.classes).repeat(n)[:n] if args.classes else true_labels[:n].cpu()
        y = y.repeat_interleave(k).to(device)
        model_fn = ddpm.for_labels(model_fn, y, args.guidance, net.null_label)
    sched = ddpm.make_schedule(config["schedule"], config["timesteps"], device)
    t0 = time.perf_counter()
    filled = ddpm.inpaint(model_fn, sched, x0, known, config["pred"], args.resample or 1, gen)
    log(f"inpainted {n} digits x {k} completions in {time.perf_counter() - t0:.1f}s "
        f"({config['timesteps'] * (args.resample or 1)} network calls each)")
    rows = [((x0 + 1) / 2 * known + 0.5 * (1 - known))[::k, None],          # the masked input
            ((filled + 1) / 2).view(n, k, 1, 28, 28),                        # the completions
            ((x0[::k] + 1) / 2)[:, None]]                                    # the original
    ddpm.save_image(torch.cat(rows, 1).reshape(-1, 1, 28, 28).clamp(0, 1).cpu(), path, nrow=k + 2)
    log(f"wrote {path} (rows: masked input, {k} completions, original; {args.inpaint} hidden)")


def write_trajectory(draw, args, path, y=None, rows=8, columns=10):
    """A strip per sample: x_t at evenly spaced steps of the sampler, from noise to the digit
    (a conditional model: y, `rows` labels)."""
    xs = []
    draw(rows, y, on_step=xs.append)  # every step's x (T of them for ddpm, the grid's for ddim)
    keep = sorted({int(round(v)) for v in np.linspace(0, len(xs) - 1, columns)})  # fewer if fewer steps
    strip = torch.stack([(xs[i] + 1) / 2 for i in keep], dim=1)  # (rows, columns, 1, 28, 28)
    ddpm.save_image(strip.reshape(-1, 1, 28, 28).clamp(0, 1).cpu(), path, nrow=len(keep))
    log(f"wrote {path} ({rows} samples x {len(keep)} steps of {args.sampler or 'ancestral sampling'})")


def vae_pictures(net, config, args, device, gen, out_stem):
    """Interpolation (of test digits with --data-dir, else random latents) and reconstructions."""
    test = labels = None
    if args.data_dir is not None:
        images, labels = vae.load_mnist(args.data_dir, train=False, device=device)
        test, labels = vae.likelihood_data(images[:64], config["likelihood"], config["binarize"], gen), labels[:64]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        if args.interpolate:
            path = out_stem + "_interpolation.png"
            if test is not None:
                vae.save_interpolation(net, test, path)
            else:  # the same walk as vae.save_interpolation, between 8 pairs of z ~ N(0, I), in 10 steps
                z = torch.randn((2, 8, 1, net.latent_dim), device=device, generator=gen)
                a = torch.linspace(0, 1, 10, device=device).view(1, 10, 1)
                line = (1 - a) * z[0] + a * z[1]  # (8, 10, L)
                ddpm.save_image(net.mean(net.decode(line.reshape(80, -1))).cpu(), path, nrow=10)
            log(f"wrote {path} (interpolation between {'random latents' if test is None else 'test digits'})")
        if args.reconstruct:
            path = out_stem + "_reconstructions.png"
            vae.save_reconstructions(net, test, labels, path)
            log(f"wrote {path} (test inputs over reconstructions)")


# ---------------------------------------------------------------------------------------
# 4. main
# ---------------------------------------------------------------------------------------

@torch.no_grad()  # nothing here trains
def main(argv=None):
    args = parse_args(argv)
    ckpt = load_any_checkpoint(args.ckpt)
    kind, config = ckpt["kind"], ckpt["config"]
    check_flags(args, ckpt)
    out = check_outputs(args)

    script, drawer = KINDS[kind]
    device = script.setup(args)  # the checkpoint's own script: device, compile/amp defaults
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    net = load_network(ckpt, device, args.raw_weights)
    if args.inpaint:
        return write_inpainting(net, config, args, device, gen, out)
    draw = drawer(ckpt, net, args, device, gen)
    labels = class_labels(args) if is_conditional(ckpt) else None
    n = args.n if labels is None else len(labels)
    how = ""
    if kind in DIFFUSION:
        how = args.sampler + (f", {args.sample_steps} steps, eta {args.eta:g}" if args.sampler == "ddim" else "")
        how = f" ({how}" + (f", guidance w = {args.guidance:g}" if labels is not None else "") + ")"
    log(f"{kind} checkpoint {args.ckpt} (step {ckpt['step']}) on {device.type}, compile={args.compile}, "
        f"amp={args.amp}: drawing {n} samples{how}" + ("" if labels is None else f" of the digits {sorted(set(labels.tolist()))}"))
    if args.guidance_sweep:
        return write_guidance_sweep(draw, args, labels, device, gen, out)

    samples = np.empty((n, 1, 28, 28), dtype=np.float32)  # gathered on the host: device memory stays flat
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        b = min(args.batch_size, n - i)
        x = draw(b) if labels is None else draw(b, labels[i:i + b].to(device))
        samples[i:i + b] = x.float().clamp(0, 1).cpu().numpy()
    seconds = time.perf_counter() - t0
    speed = n / seconds
    log(f"drew {n} samples in {seconds:.2f}s ({f'{speed:,.0f}' if speed >= 100 else f'{speed:.3g}'} images/s)")
    shown = torch.from_numpy(samples[:GRID_MAX])
    ddpm.save_image(shown, out, nrow=args.nrow or args.per_class or int(math.ceil(math.sqrt(len(shown)))))
    log(f"wrote {out} ({len(shown)} images{'' if n <= GRID_MAX else f'; all {n} are in the array'})")
    if args.save_array:  # with the labels asked for, for score.py's accuracy
        np.savez_compressed(args.save_array, samples=samples, **({} if labels is None else {"labels": labels.numpy()}))
        log(f"wrote {args.save_array} (samples: {samples.shape} float32 in [0, 1]{'' if labels is None else ', labels'})")

    stem = os.path.splitext(out)[0]
    if args.trajectory:
        y = None if labels is None else labels.repeat(8)[:8].to(device)
        write_trajectory(draw, args, stem + "_trajectory.png", y)
    if args.interpolate or args.reconstruct:
        vae_pictures(net, config, args, device, gen, stem)


# ---------------------------------------------------------------------------------------
# Run plumbing of this script: the command line and its checks (all made before anything
# is drawn), the log
# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    for script in (ddpm, vae, vae_no_encoder, discrete_diffusion):  # latent_diffusion's plumbing is ddpm's
        script.PROG = os.path.basename(__file__)  # "sample.py: error: ...", from the checkpoint's script's plumbing too
    parser = make_parser()
    parser.prog, parser.error = ddpm.PROG, fail  # argparse's own errors as one line too
    return parser.parse_args(argv)


def is_conditional(ckpt):
    return bool(ckpt["config"].get("class_cond"))  # only ddpm.py and vae.py have --class-cond


def check_flags(args, ckpt):
    """Flags for another kind of checkpoint, and the ones no argparse type can check alone."""
    kind = ckpt["kind"]
    for key, owners in ONLY_FOR.items():
        if kind not in owners and getattr(args, key) not in (None, False):
            fail(f"--{key.replace('_', '-')} applies to {' and '.join(owners)} checkpoints, and this one is {kind}")
    if args.data_dir is not None and kind != "vae" and not args.inpaint:
        fail(f"--data-dir applies to vae checkpoints and to --inpaint, and this one is {kind}")
    check_conditional_flags(args, ckpt)
    if args.inpaint:
        if args.data_dir is None:
            fail("--inpaint needs --data-dir (the test digits to hide a part of)")
        if args.save_array or args.trajectory or args.guidance_sweep or args.per_class:
            fail("--inpaint draws one picture: it does not combine with --save-array, --trajectory, "
                 "--guidance-sweep or --per-class")
    elif args.resample is not None or args.completions is not None:
        fail("--resample and --completions apply to --inpaint")
    args.n = args.n or (8 if args.inpaint else 64)
    if kind in DIFFUSION:
        T = ckpt["config"]["timesteps"]
        args.sampler = args.sampler or "ddim"
        if args.sampler == "ddpm" and (args.sample_steps is not None or args.eta is not None):
            fail("--sample-steps and --eta apply to --sampler ddim (ancestral sampling uses all T steps)")
        if args.sample_steps is not None and args.sample_steps > T:
            fail(f"--sample-steps {args.sample_steps} is more than the model's T = {T}")
        args.sample_steps = None if args.sampler == "ddpm" else args.sample_steps or min(50, T)
        args.eta = 1.0 if args.eta is None else args.eta
        if args.eta < 0:
            fail(f"--eta must be >= 0, got {args.eta}")
    if args.guidance_sweep and (args.save_array or args.trajectory):
        fail("--guidance-sweep draws one picture: save arrays one --guidance at a time")
    if kind == "vae" and args.interpolate and is_conditional(ckpt):
        fail("--interpolate walks between latents of one label; this VAE is conditional (its style grid is "
             "style.png of the training run)")
    if kind == "vae" and args.reconstruct and args.data_dir is None:
        fail("--reconstruct needs --data-dir (the test digits to reconstruct)")
    if args.save_array is not None and not args.save_array.endswith(".npz"):
        fail(f"--save-array writes an .npz file, got {args.save_array!r}")


def check_conditional_flags(args, ckpt):
    """--class, --per-class, --guidance[-sweep]: for conditional checkpoints only, digits 0..9."""
    given = [f for f, v in (("--class", args.classes), ("--per-class", args.per_class), ("--guidance", args.guidance),
                            ("--guidance-sweep", args.guidance_sweep)) if v is not None]
    if not is_conditional(ckpt):
        if given:
            fail(f"{given[0]} applies to conditional checkpoints (ddpm.py or vae.py --class-cond); "
                 f"{args.ckpt} is unconditional")
        return
    if args.classes is not None:
        try:
            args.classes = [int(v) for text in args.classes for v in text.split(",")]
        except ValueError:
            fail(f"--class takes digits 0..9, e.g. --class 3 or --class 3,7; got {' '.join(args.classes)!r}")
        if not all(0 <= c <= 9 for c in args.classes):
            fail(f"--class takes digits 0..9, got {args.classes}")
    if args.per_class and args.n is not None:
        fail("--per-class K draws K of each class: give it or --n, not both")
    if ckpt["kind"] == "ddpm":
        args.guidance = ckpt["config"]["guidance"] if args.guidance is None else args.guidance
        if args.guidance_sweep is not None:
            try:
                [float(w) for w in args.guidance_sweep.split(",")]
            except ValueError:
                fail(f"--guidance-sweep takes weights like 0,1,3,5; got {args.guidance_sweep!r}")


def check_outputs(args):
    """The grid's path, once both outputs are known writable: before minutes of sampling, not after."""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    for flag, path in (("--out", out), ("--save-array", args.save_array)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            fail(f"{flag} {path} is a folder: give a file name")
        if flag == "--out" and os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
            fail(f"--out writes a picture: give a name ending in {', '.join(IMAGE_EXTENSIONS)}; got {path!r}")
        if not os.path.isdir(folder):
            fail(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            fail(f"{flag} {path}: the folder {folder} is not writable")
    return out


if __name__ == "__main__":
    main()
