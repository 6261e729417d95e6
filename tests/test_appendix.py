"""The shared appendix: one block of plumbing, byte-identical in every script that must run
alone, and the few math helpers that two standalone chapters both need, identical too."""
import argparse
import copy
import importlib
import inspect
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = "# ==================================== appendix: plumbing ===================================="
END = "# ================================== end of the appendix =================================="
CARRIERS = ["ddpm.py", "vae.py", "vae_no_encoder.py", "score.py", "discrete_diffusion.py"]


def appendix(name):
    lines = open(os.path.join(ROOT, name)).read().splitlines()
    assert lines.count(START) == 1 and lines.count(END) == 1, f"{name}: one start and one end marker"
    start, end = lines.index(START), lines.index(END)
    assert start < end, name
    return lines[start:end + 1], lines[end + 1:]


@pytest.mark.parametrize("name", CARRIERS[1:])
def test_the_appendix_is_the_same_block_in_every_script(name):
    reference, _ = appendix("ddpm.py")
    block, _ = appendix(name)
    for i, (a, b) in enumerate(zip(reference, block)):
        assert a == b, f"{name} differs from ddpm.py at appendix line {i + 1}:\n  ddpm.py: {a}\n  {name}: {b}"
    assert len(block) == len(reference), f"{name}: {len(block)} appendix lines, ddpm.py {len(reference)}"


@pytest.mark.parametrize("name", CARRIERS)
def test_only_the_main_guard_follows_the_appendix(name):
    _, after = appendix(name)
    assert [line for line in after if line.strip()] == ['if __name__ == "__main__":', "    main()"], name


def test_a_script_that_imports_a_sibling_imports_its_plumbing():
    text = open(os.path.join(ROOT, "latent_diffusion.py")).read()
    assert START not in text and "def load_mnist" not in text and "class Meter" not in text


# Math that two chapters need and neither may import from the other (vae.py imports nothing;
# vae_no_encoder.py and discrete_diffusion.py only unet.py): one name, one signature, one text.
SHARED_MATH = [
    ("normal_kl", ["ddpm", "vae", "vae_no_encoder"]),
    ("log_ndtr", ["ddpm", "vae_no_encoder"]),
    ("log_normal_cdf_diff", ["ddpm", "vae_no_encoder"]),
    ("discretized_gaussian_log_likelihood", ["ddpm", "vae_no_encoder"]),
    ("to_model_range", ["ddpm", "vae_no_encoder"]),
    ("ema_decay", ["ddpm", "discrete_diffusion"]),
    ("ema_update", ["ddpm", "discrete_diffusion"]),
    ("parse_channel_mult", ["ddpm", "discrete_diffusion"]),
]


@pytest.mark.parametrize("function,modules", SHARED_MATH)
def test_shared_math_is_one_text(function, modules):
    texts = {m: inspect.getsource(getattr(importlib.import_module(m), function)) for m in modules}
    reference = texts[modules[0]]
    for m, text in texts.items():
        assert text == reference, f"{m}.{function} differs from {modules[0]}.{function}"


@pytest.mark.parametrize("name", CARRIERS + ["latent_diffusion.py", "sample.py", "bench.py"])
def test_help_explains_every_flag_and_shows_each_default_but_none(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no help text wrapped: one entry is one or two lines
    parser = importlib.import_module(name[:-3]).make_parser()
    entries = {}  # "  --flag ..." and the lines indented under it, as one line
    for line in parser.format_help().splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif line.startswith("   ") and entries:
            entries[key] += " " + line.strip()
    assert "default: None" not in parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0] if action.option_strings else action.metavar
        assert action.help, f"{name}: {flag} has no help text"
        if action.default is not None:
            assert entries[flag].endswith(f"(default: {action.default})"), f"{name}: {entries[flag]}"


def test_a_restored_optimizer_keeps_this_runs_kernel_options_and_the_checkpoints_state():
    """A checkpoint of a CUDA run (fused, capturable AdamW) resumed on this CPU: the optimizer runs
    this run's way (fused, not capturable) but with the checkpoint's moments, step count and
    hyperparameters, i.e. it continues exactly as the saved optimizer would have."""
    import ddpm
    gen = torch.Generator().manual_seed(0)
    start, grads = torch.randn(5, generator=gen), [torch.randn(5, generator=gen) for _ in range(4)]
    saved = torch.nn.Parameter(start.clone())
    opt = torch.optim.AdamW([saved], lr=1e-2, weight_decay=0.1, foreach=False)
    for g in grads[:2]:
        saved.grad = g.clone()
        opt.step()
    ckpt = {"optimizer": copy.deepcopy(opt.state_dict()), "rng": {"cpu": torch.get_rng_state()}, "step": 2, "epoch": 0}
    ckpt["optimizer"]["param_groups"][0].update(fused=True, capturable=True, foreach=None)  # as a CUDA run saves it

    resumed = torch.nn.Parameter(saved.detach().clone())
    opt_here = torch.optim.AdamW([resumed], lr=0.5, weight_decay=0.0, fused=True)  # this run's options
    ddpm.restore(ckpt, torch.device("cpu"), optimizer=opt_here)
    group = opt_here.param_groups[0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (True, False, None)
    assert (group["lr"], group["weight_decay"]) == (1e-2, 0.1)  # the checkpoint's
    for g in grads[2:]:  # the saved optimizer, continued, is the reference
        saved.grad, resumed.grad = g.clone(), g.clone()
        opt.step()
        opt_here.step()
    assert torch.allclose(resumed, saved, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CARRIERS + ["latent_diffusion.py", "sample.py"])
def test_torch_compile_is_off_by_default_on_every_device(name, monkeypatch):
    """One rule in every script: --compile is asked for, never switched on by the device (a cold
    compile costs about a minute, more than a default run's eager kernels). setup() runs here with
    CUDA reported present, as on a GPU machine, and leaves the choice as the command line made it."""
    module = importlib.import_module(name[:-3])
    parser = module.make_parser()
    compile_action = next(a for a in parser._actions if "--compile" in a.option_strings)
    assert compile_action.default is False, f"{name}: --compile defaults to {compile_action.default!r}"
    carrier = module if hasattr(module, "setup") else importlib.import_module("ddpm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for asked in (False, True):
        args = argparse.Namespace(device="cuda", compile=asked, amp=None)
        carrier.setup(args)
        assert args.compile is asked and args.amp is True, name  # bf16 still follows the device
