"""
bench.py: how fast does a configuration train and sample, and how much of the device does it use?

    python bench.py                                    # ddpm.py's default model and batch, on the best device
    python bench.py --channels 16 --batch-size 32      # any ddpm.py flag picks another configuration
    python bench.py --script vae                       # vae.py's defaults (and any vae.py flag)
    python bench.py --script vae_no_encoder --json out/bench.json

It builds the model, the loss and the optimizer step with the script's own functions (no
copies), runs --warmup steps and reports them apart (on CUDA they include torch.compile),
then times --steps steps with the device synchronised, and prints

    images/s and ms per step   of training, steady state
    peak memory                of the timed steps (CUDA: allocated tensors; CPU: the process's RSS)
    FLOPs per image            one forward and backward, counted once by torch's FlopCounterMode
    MFU                        FLOPs per image x images/s / the device's peak (ddpm.PEAK_TFLOPS;
                               bf16 with --amp, else TF32), or a note that the device is not in the table
    samples/s                  ddpm: DDIM-50 (the default sampler) and ancestral (all T steps);
                               the VAEs: one decoder pass
    where the time goes        with --profile N: N more steps under torch.profiler, the kernels'
                               device time per step by kind (elsewhere: torch ops' CPU time)

The digits are random bytes on the device: speed does not depend on what the pixels show, so
no MNIST is needed. The README's performance table quotes this script's output.
"""

import argparse
import collections
import contextlib
import functools
import importlib
import json
import os
import re
import sys
import time

import torch

import ddpm
from ddpm import fail, log  # the shared plumbing's one error line and log

SCRIPTS = ("ddpm", "vae", "vae_no_encoder")


def make_parser():
    """bench.py's own flags; every other flag goes to the benchmarked script's parser."""
    p = argparse.ArgumentParser(description="Time training steps and sampling of a script's configuration.",
                                allow_abbrev=False,  # --channels is the script's, not short for --channels-last
                                formatter_class=ddpm.HelpFormatter,
                                epilog="Any other flag is the benchmarked script's (e.g. --channels 16, --batch-size 64).")
    p.add_argument("--script", choices=SCRIPTS, default="ddpm", help="whose configuration and functions")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default: 50 on CUDA, 10 elsewhere)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 2 elsewhere)")
    p.add_argument("--sample-n", type=sample_sizes, default=None, metavar="N[,N...]",
                   help="samples drawn in one batch for the sampler timings (default: 10000 on CUDA, 100 elsewhere); "
                        "several: each batch size in turn (ancestral: the first)")
    p.add_argument("--ancestral", action=argparse.BooleanOptionalAction, default=None,
                   help="ddpm: also time ancestral sampling, all T steps (default: on CUDA only; slow elsewhere)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the figures here")
    g = p.add_argument_group("speed experiments (what wins goes into the script's appendix, with its measurement)")
    g.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                   help="torch.compile mode for the script's --compile (reduce-overhead: CUDA graphs)")
    g.add_argument("--channels-last", action="store_true", help="the networks' weights and activations in NHWC (training's and sampling's)")
    g.add_argument("--force-layout", action="store_true",
                   help="inductor's layout optimisation (NHWC inside the compiled graph) forced on: its own "
                        "heuristic turns it off for this U-Net")
    g.add_argument("--compile-samplers", action="store_true",
                   help="ddpm: torch.compile the EMA network that samples (ddpm.py samples eagerly)")
    g.add_argument("--bf16-weights", action="store_true",
                   help="ddpm, --amp: bf16 copies of the convolution and linear weights made in one multi-tensor "
                        "cast per step, in place of autocast's cast per layer (and the same for their gradients)")
    g.add_argument("--sync-debug", action="store_true",
                   help="CUDA: warn (with a stack) at every host-device sync inside the timed steps")
    g.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the timing, profile this many more steps: device time per step by kind of kernel "
                        "(CUDA; elsewhere the CPU time of torch's ops) and the top kernels")
    return p


def parse_args(argv=None):
    """(bench.py's flags, the rest for the script); bad input is one line."""
    for script in SCRIPTS:  # "bench.py: error: ...", also for the script's own flags and checks
        importlib.import_module(script).PROG = os.path.basename(__file__)
    p = make_parser()
    p.prog, p.error = ddpm.PROG, fail
    args, rest = p.parse_known_args(argv)
    for name in ("steps", "warmup", "profile"):
        value, least = getattr(args, name), 0 if name in ("warmup", "profile") else 1
        if value is not None and value < least:
            fail(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return args, rest


def sample_sizes(text):
    """--sample-n: one or more positive batch sizes, comma-separated."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return sizes


def script_config(script, rest):
    """The script's module and its parsed flags (its defaults plus `rest`), with its checks."""
    module = importlib.import_module(script)
    return module, module.parse_args(["--data-dir", "unused"] + rest)  # nothing is loaded: the digits are random


# ---------------------------------------------------------------------------------------
# A training step and a sampler per script, from each script's own functions
# ---------------------------------------------------------------------------------------
# Each builder returns a dict: net (the trained module), step(images, labels, i) -> per-image
# losses (one whole optimizer step, as the script's train() takes it), samplers {name: draw(n)},
# flops() (or None: counted here on loss_of(model_fn, images, labels)), and sampling_net where
# the samplers run another module than net (ddpm: the EMA copy).

def ddpm_parts(m, config, device, compile_samplers=False, bf16_weights=False):
    """ddpm.py's own training step, make_train_step, recorded as a CUDA graph by its replayable()
    exactly as train() runs it (no second copy of the step). bf16_weights: the training network
    runs as BF16Weights(net), an experiment."""
    torch.manual_seed(config.seed)
    sched = m.make_schedule(config.schedule, config.timesteps, device)
    net = m.build_model(vars(config)).to(device)
    ema = m.build_model(vars(config)).to(device).requires_grad_(False).eval()
    ema.load_state_dict(net.state_dict())
    ema_fn = m.make_model_fn(ema, device, config.amp, compile_samplers)  # ddpm.py samples eagerly
    lr, decay = torch.tensor(config.lr, device=device), torch.tensor(0.0, device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **m.adam_options(device))
    train_fn = m.make_model_fn(BF16Weights(net) if bf16_weights else net, device, config.amp, config.compile)
    config.cuda_graph = m.cuda_graph_on(config.cuda_graph, device)
    train_step = m.replayable(m.make_train_step(train_fn, net, ema, opt, sched, config), device, config.cuda_graph)
    sample_steps = config.sample_steps or min(50, config.timesteps)

    def step(images, labels, i):
        lr.fill_(config.lr * min(1.0, (i + 1) / config.warmup_steps))
        decay.fill_(m.ema_decay(i, config.ema_decay))
        return train_step(images, labels, decay)[0]

    def draw(n, sampler, steps=None):
        model_fn = (m.for_labels(ema_fn, torch.arange(n, device=device) % 10, config.guidance, ema.null_label) if config.class_cond
                    else ema_fn)
        return m.sample(model_fn, sched, n, config.pred, sampler, steps, config.eta)

    samplers = {f"DDIM-{sample_steps}, eta {config.eta:g}": lambda n, steps=sample_steps: draw(n, "ddim", steps)}
    samplers[f"ancestral ({config.timesteps} steps)"] = lambda n, steps=None: draw(n, "ddpm")
    return {"net": net, "sampling_net": ema, "step": step, "samplers": samplers,
            "flops": lambda: m.training_flops_per_image(net, sched, config, device)}


class CastOnce(torch.autograd.Function):
    """Tensors -> bf16 copies, in one multi-tensor copy; their gradients back to fp32 the same way."""
    @staticmethod
    def forward(ctx, *tensors):
        return tuple(cast_all(tensors, torch.bfloat16))

    @staticmethod
    def backward(ctx, *grads):
        return tuple(cast_all(grads, torch.float32))


def cast_all(tensors, dtype):
    copies = [torch.empty_like(t, dtype=dtype) for t in tensors]
    torch._foreach_copy_(copies, list(tensors))  # a few kernels for all of them, not one per tensor
    return copies


class BF16Weights(torch.nn.Module):
    """net, run on bf16 copies of its convolution and linear parameters cast once per call, so
    that autocast finds them in bf16 and casts none (it casts each weight at each use, and each
    gradient back: ~270 small kernels per step of ddpm.py's default U-Net, issue 21). The same
    numbers: autocast rounds the same fp32 weights to bf16. Norms and embeddings stay fp32
    (autocast runs GroupNorm in fp32)."""
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.names = [f"{name}.{p}" for name, mod in net.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))
                      for p, _ in mod.named_parameters(recurse=False)]

    def forward(self, *inputs):
        params = dict(self.net.named_parameters())
        copies = CastOnce.apply(*[params[name] for name in self.names])
        return torch.func.functional_call(self.net, dict(zip(self.names, copies)), inputs)


def plain_step(net, loss_of, optimizer, config, device, m):
    """The zero_grad / backward / clip / optimizer step of the VAE scripts' train()."""
    opt = optimizer(net.parameters(), lr=config.lr, fused=m.fused_adam_ok(device))
    model_fn = m.make_model_fn(net, device, config.amp, config.compile)
    params, clip = list(net.parameters()), getattr(config, "grad_clip", None)

    def step(images, labels, i):
        loss = loss_of(model_fn, images, labels)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss
    return step


def vae_parts(m, config, device):
    torch.manual_seed(config.seed)
    net = m.build_model(vars(config)).to(device)

    def loss_of(model_fn, images, labels):
        x = m.likelihood_data(images, config.likelihood, config.binarize)
        eps = torch.randn(x.shape[0], config.latent_dim, device=device)
        recon, kl = m.elbo_terms(model_fn, net, x, eps, labels if config.class_cond else None)
        return recon + config.beta * kl

    @torch.no_grad()
    def draw(n, steps=None):  # decoder means of z ~ N(0, I), as vae.py's grids and scores
        y = torch.arange(n, device=device) % 10 if config.class_cond else None
        with torch.autocast(device.type, torch.bfloat16, enabled=config.amp):
            return net.sample(n, y=y)
    return {"net": net, "loss_of": loss_of, "step": plain_step(net, loss_of, torch.optim.Adam, config, device, m),
            "samplers": {"decoder pass": draw}}


def vae_no_encoder_parts(m, config, device):
    torch.manual_seed(config.seed)
    model = m.build_model(vars(config)).to(device)
    net_fn = m.make_model_fn(model.net, device, config.amp, config.compile)

    def loss_of(model_fn, images, labels):
        return m.noise_prediction_loss(model_fn, m.to_model_range(images), config.alpha_bar, config.pred)

    def draw(n, steps=None):
        return m.generate(net_fn, model, n, "standard")[0]
    return {"net": model.net, "loss_of": loss_of,
            "step": plain_step(model.net, loss_of, torch.optim.AdamW, config, device, m), "samplers": {"decoder pass": draw}}


PARTS = {"ddpm": ddpm_parts, "vae": vae_parts, "vae_no_encoder": vae_no_encoder_parts}


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def compile_mode(mode):
    """The scripts call torch.compile(net) without a mode; inside this block it gets `mode`."""
    original = torch.compile
    if mode:
        torch.compile = functools.partial(original, mode=mode)
    try:
        yield
    finally:
        torch.compile = original


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_flops_per_image(net, loss_of, device, batch=2):
    """FLOPs of one training image: the loss's forward and backward through the plain module."""
    from torch.utils.flop_counter import FlopCounterMode
    images = torch.randint(0, 256, (batch, 28, 28), dtype=torch.uint8, device=device)
    labels = torch.arange(batch, device=device) % 10
    with FlopCounterMode(display=False) as counter:
        loss_of(net, images, labels).mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def random_batches(n, batch_size, device):
    """n batches of random digits (uint8) and labels: the speed does not depend on the pixels."""
    return (torch.randint(0, 256, (n, batch_size, 28, 28), dtype=torch.uint8, device=device),
            torch.randint(0, 10, (n, batch_size), device=device))


def time_training(config, parts, device, warmup, steps, sync_debug=False):
    """(warm-up seconds, timed seconds) of the script's optimizer step on random digits."""
    step = parts["step"]
    data, labels = random_batches(warmup + steps, config.batch_size, device)
    parts["net"].train()

    def run(first, last):
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(first, last):
            step(data[i], labels[i], i)
        synchronize(device)
        return time.perf_counter() - t0

    warm = run(0, warmup)
    if device.type != "cuda":
        return warm, run(warmup, warmup + steps)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.set_sync_debug_mode("warn" if sync_debug else 0)
    try:
        return warm, run(warmup, warmup + steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# The profile sorts each kernel (on CUDA) or torch op (elsewhere) by its name's first match here.
KERNEL_KINDS = (
    ("torch.compile's fused kernels", r"^triton_"),
    ("attention", r"softmax|flash|fmha|attention|sdpa"),
    ("cuDNN's NCHW<->NHWC transposes", r"nchwtonhwc|nhwctonchw"),
    ("convolutions", r"conv|xmma_fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("matrix products", r"gemm|nvjet|cutlass|matmul|linear|aten::(add)?b?mm$"),
    ("GroupNorm", r"group_?norm|rowwisemoments|fusedparams|gammabeta|internalgradients"),
    ("optimizer, EMA and clipping", r"foreach|multi_tensor|adam|lpnorm"),
    ("casts and copies", r"copy|memcpy|cast|convert"),
    ("random numbers", r"rand|normal|uniform|philox|distribution"),
)


def kernel_kind(name):
    """The kind of a kernel or op, for the profile: KERNEL_KINDS's first match, else 'elementwise and other'."""
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)),
                "elementwise and other")


def profile_training(config, parts, device, steps, ms_per_step, top=12):
    """Where a step's time goes: torch.profiler over `steps` more steps (replays, if recorded).
    On CUDA, the kernels' device time (their sum against the timed step shows how far the step
    is from its kernels' floor); elsewhere, the self CPU time of torch's ops."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    data, labels = random_batches(steps, config.batch_size, device)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(steps):
            parts["step"](data[i], labels[i], i)
        synchronize(device)
    where = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    rows = [(e.key, e.count / steps, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / steps)
            for e in prof.key_averages() if e.device_type == where]  # (name, calls per step, ms per step)
    total = sum(ms for _, _, ms in rows)
    kinds = collections.defaultdict(float)
    for name, _, ms in rows:
        kinds[kernel_kind(name)] += ms
    what = "kernels' device time" if cuda else "torch ops' CPU time"
    result = {"what": what, "steps": steps, "ms_per_step": total, "calls_per_step": sum(c for _, c, _ in rows),
              "by_kind_ms_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
              "top": [{"name": name, "calls_per_step": calls, "ms_per_step": ms}
                      for name, calls, ms in sorted(rows, key=lambda r: -r[2])[:top]]}
    log(f"profile of {steps} steps: {total:.2f} ms of {what} per step"
        + (f" ({100 * total / ms_per_step:.0f}% of the timed {ms_per_step:.2f} ms)" if cuda else "")
        + f", {result['calls_per_step']:,.0f} {'kernels' if cuda else 'ops'} per step; by kind: "
        + ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in result["by_kind_ms_per_step"].items()))
    for row in result["top"]:
        log(f"  {row['ms_per_step']:7.3f} ms {row['calls_per_step']:6.1f}x  {row['name'][:100]}")
    return result


def time_sampler(draw, n, device, warm_steps=2):
    """(samples/s, warm-up seconds) of one batch of n. A short run first (warm_steps sampler
    steps) compiles the network for the batch's shapes; 0 skips it (the shapes are known)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        if warm_steps:
            draw(n, warm_steps)
        synchronize(device)
        t1 = time.perf_counter()
        draw(n)
        synchronize(device)
    return n / (time.perf_counter() - t1), t1 - t0


def main(argv=None):
    args, rest = parse_args(argv)
    m, config = script_config(args.script, rest)
    device = m.setup(config)
    for flag, asked in (("--compile-mode", args.compile_mode), ("--force-layout", args.force_layout)):
        if asked and not config.compile:
            fail(f"{flag} needs torch.compile: pass --compile")
    for flag, asked in (("--compile-samplers", args.compile_samplers), ("--bf16-weights", args.bf16_weights)):
        if asked and args.script != "ddpm":
            fail(f"{flag} applies to --script ddpm")
    if args.bf16_weights and not config.amp:
        fail(f"--bf16-weights replaces autocast's casts: pass --amp (on by default on CUDA only; here {device.type})")
    layout = contextlib.nullcontext()
    if args.force_layout:  # for this run only: torch's own patch() puts the flag back afterwards
        import torch._inductor.config as inductor_config
        layout = inductor_config.patch(force_layout_optimization=True)
    with layout:
        return measure(args, argv, rest, m, config, device)


def measure(args, argv, rest, m, config, device):
    """The timings of main(): training steps, the profile if asked, each sampler."""
    cuda = device.type == "cuda"
    steps, warmup = args.steps or (50 if cuda else 10), args.warmup if args.warmup is not None else (10 if cuda else 2)
    sample_ns = args.sample_n or [10_000 if cuda else 100]
    ancestral = cuda if args.ancestral is None else args.ancestral
    with compile_mode(args.compile_mode):  # the model functions are wrapped (compiled lazily) here
        experiments = {"compile_samplers": args.compile_samplers, "bf16_weights": args.bf16_weights}  # ddpm's
        parts = PARTS[args.script](m, config, device, **(experiments if args.script == "ddpm" else {}))
    if args.channels_last:
        for key in ("net", "sampling_net"):
            if key in parts:
                parts[key].to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in parts["net"].parameters())
    name = m.describe(device)
    log(f"bench: {args.script}.py {' '.join(rest) or '(defaults)'} | {n_params / 1e6:.2f}M parameters, batch "
        f"{config.batch_size} | {name}, compile={config.compile}" + (f" ({args.compile_mode})" if args.compile_mode else "")
        + f", amp={config.amp}" + (", channels_last" if args.channels_last else "")
        + (", inductor layout forced" if args.force_layout else "") + (", bf16 weights" if args.bf16_weights else "")
        + f" | torch {torch.__version__}")

    flops = parts["flops"]() if "flops" in parts else count_flops_per_image(parts["net"], parts["loss_of"], device)
    with compile_mode(args.compile_mode):
        warm, timed = time_training(config, parts, device, warmup, steps, args.sync_debug)
    images_per_sec = steps * config.batch_size / timed
    peak = m.peak_memory_mb(device)  # of the timed steps, before anything else runs
    peak_flops = ddpm.peak_flops(device, config.amp)
    mfu = flops * images_per_sec / peak_flops if peak_flops else None
    flags = list(sys.argv[1:] if argv is None else argv)  # bench.py's and the script's, as given
    result = {"script": args.script, "flags": flags, "compile_mode": args.compile_mode,
              "channels_last": args.channels_last, "force_layout": args.force_layout,
              "compile_samplers": args.compile_samplers, "bf16_weights": args.bf16_weights, "device": name,
              "torch": torch.__version__,
              "compile": config.compile, "cuda_graph": getattr(config, "cuda_graph", None), "amp": config.amp,
              "batch_size": config.batch_size, "parameters": n_params,
              "warmup_steps": warmup, "warmup_seconds": warm, "steps": steps, "ms_per_step": 1000 * timed / steps,
              "train_images_per_sec": images_per_sec, "peak_memory_mb": peak, "train_flops_per_image": flops,
              "peak_flops": peak_flops, "mfu": mfu, "samplers": {}}
    included = [name for name, on in (("torch.compile", config.compile),
                                       ("the CUDA graph's recording", getattr(config, "cuda_graph", False))) if on]
    log(f"warm-up: {warmup} steps in {warm:.1f}s" + (f" ({' and '.join(included)} included)" if included else ""))
    log(f"train: {images_per_sec:,.0f} images/s | {1000 * timed / steps:.2f} ms/step over {steps} steps | "
        f"peak memory {peak:,.0f} MB | {flops / 1e9:.3f} GFLOP per image (forward + backward) | "
        + (f"MFU {100 * mfu:.1f}% of {peak_flops / 1e12:.0f} TFLOP/s ({'bf16' if config.amp else 'TF32'})" if mfu
           else f"MFU: no peak FLOP/s known for {name} (ddpm.PEAK_TFLOPS)"))
    if args.profile:
        with compile_mode(args.compile_mode):
            result["profile"] = profile_training(config, parts, device, args.profile, 1000 * timed / steps)

    for label, draw in parts["samplers"].items():
        if label.startswith("ancestral") and not ancestral:
            log(f"sample: {label} skipped (pass --ancestral: {config.timesteps} network calls per batch)")
            continue
        ancestral_run = label.startswith("ancestral")  # one batch size; DDIM warmed its shapes up
        for n in sample_ns[:1] if ancestral_run else sample_ns:
            speed, warm_seconds = time_sampler(draw, n, device, warm_steps=0 if ancestral_run else 2)
            result["samplers"][label if n == sample_ns[0] else f"{label}, n={n}"] = {
                "n": n, "sample_images_per_sec": speed, "seconds": n / speed, "warmup_seconds": warm_seconds}
            warm_note = "" if ancestral_run else f"; 2 warm-up steps first: {warm_seconds:.1f}s, any compile included"
            log(f"sample: {label}: {f'{speed:,.0f}' if speed >= 100 else f'{speed:.3g}'} samples/s "
                f"({n:,} in {n / speed:.2f}s, one batch{warm_note})")
    result["peak_memory_mb_with_sampling"] = m.peak_memory_mb(device)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
