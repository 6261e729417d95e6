"""bench.py: its figures for tiny configurations of each script, its FLOP count against a hand
count, the MFU's peak table, the flags it passes through, and one line for bad input."""
import argparse
import json

import pytest
import torch

import bench
import ddpm

TINY_DDPM = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--timesteps", "10", "--no-attention", "--batch-size", "4",
             "--device", "cpu"]
FAST = ["--steps", "2", "--warmup", "1", "--sample-n", "3"]


def test_ddpm_figures_and_json(tmp_path, capsys):
    result = bench.main([*FAST, *TINY_DDPM, "--ancestral", "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert json.load(open(tmp_path / "b.json")) == json.loads(json.dumps(result))
    assert result["batch_size"] == 4 and result["steps"] == 2 and result["warmup_steps"] == 1
    assert result["train_images_per_sec"] == pytest.approx(4 * 2 / (result["ms_per_step"] * 2 / 1000))
    assert set(result["samplers"]) == {"DDIM-10, eta 1", "ancestral (10 steps)"}  # DDIM: min(50, T) steps
    assert all(s["n"] == 3 and s["sample_images_per_sec"] > 0 for s in result["samplers"].values())
    assert result["mfu"] is None and "MFU: no peak FLOP/s known for cpu" in out  # a CPU has no entry
    net = ddpm.build_model(vars(ddpm.parse_args(["--data-dir", "x", *TINY_DDPM])))
    assert result["parameters"] == sum(p.numel() for p in net.parameters())


def test_ancestral_is_skipped_off_a_gpu_unless_asked(capsys):
    result = bench.main([*FAST, *TINY_DDPM])
    assert list(result["samplers"]) == ["DDIM-10, eta 1"]
    assert "ancestral (10 steps) skipped" in capsys.readouterr().out


def test_vae_flops_per_image_match_a_hand_count():
    """MLP VAE 784-400-(20+20) / 20-400-784: a linear layer costs 2 in out multiply-adds
    forward and twice that backward (input and weight gradients), except the first layer,
    whose input needs no gradient. Biases, activations and the loss are not counted."""
    _, config = bench.script_config("vae", ["--device", "cpu"])
    parts = bench.vae_parts(__import__("vae"), config, torch.device("cpu"))
    layers = [(784, 400), (400, 40), (20, 400), (400, 784)]
    forward = sum(2 * i * o for i, o in layers)
    expected = 3 * forward - 2 * 784 * 400
    assert bench.count_flops_per_image(parts["net"], parts["loss_of"], torch.device("cpu")) == expected


def test_ddpm_flops_per_image_of_the_default_model():
    """The issue quotes ~1.66 GFLOP for one training image of the default U-Net."""
    config = ddpm.parse_args(["--data-dir", "x", "--device", "cpu"])
    config.amp = False
    net = ddpm.build_model(vars(config))
    sched = ddpm.make_schedule(config.schedule, config.timesteps)
    flops = ddpm.training_flops_per_image(net, sched, config, torch.device("cpu"))
    assert flops == pytest.approx(1.66e9, rel=0.05)
    rng = torch.get_rng_state()
    ddpm.training_flops_per_image(net, sched, config, torch.device("cpu"))
    assert torch.equal(rng, torch.get_rng_state())  # counting leaves the run's random stream alone
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("name, amp, peak", [("NVIDIA H100 80GB HBM3", True, 989e12), ("NVIDIA H100 PCIe", True, 756e12),
                                             ("NVIDIA H100 80GB HBM3", False, 495e12), ("NVIDIA A100-SXM4-80GB", True, 312e12),
                                             ("NVIDIA L40S", True, 362e12), ("NVIDIA L4", True, 121e12),
                                             ("Some Future GPU", True, None)])
def test_peak_flops_table(monkeypatch, name, amp, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert ddpm.peak_flops(torch.device("cuda"), amp) == peak
    assert ddpm.peak_flops(torch.device("cpu"), amp) is None


def test_mfu_note(monkeypatch):
    """MFU = FLOPs per image x images/s / peak: 1 GFLOP x 98,900 images/s on 989 TFLOP/s is 10%."""
    monkeypatch.setattr(ddpm, "peak_flops", lambda device, amp: 989e12)
    monkeypatch.setattr(ddpm, "training_flops_per_image", lambda *a: 1e9)
    note = ddpm.mfu_note(None, None, argparse.Namespace(amp=True), torch.device("cuda"))
    assert note(98_900) == "MFU 10.0%"


@pytest.mark.parametrize("script", ["vae", "vae_no_encoder"])
def test_the_vaes(script, capsys):
    flags = {"vae": ["--hidden-dim", "16", "--latent-dim", "3"], "vae_no_encoder": ["--channels", "8"]}[script]
    result = bench.main(["--script", script, *FAST, *flags, "--batch-size", "4", "--device", "cpu"])
    assert result["script"] == script and result["train_flops_per_image"] > 0
    assert list(result["samplers"]) == ["decoder pass"]


@pytest.mark.parametrize("argv, needle", [(["--steps", "0"], "--steps must be >= 1"),
                                          (["--script", "gan"], "invalid choice"),
                                          (["--channels", "zero"], "--channels")])
def test_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and needle in err[0], err


def test_speed_experiment_flags(monkeypatch, capsys):
    """--compile-mode reaches torch.compile (recorded here, not run: compiling takes a minute on a
    CPU) and is undone afterwards; --channels-last runs."""
    modes = []
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: modes.append(kw.get("mode")) or net)
    patched = torch.compile
    result = bench.main([*FAST, *TINY_DDPM, "--compile", "--compile-mode", "reduce-overhead", "--channels-last"])
    assert modes and set(modes) == {"reduce-overhead"}
    assert len(modes) == 1  # the training network only: the samplers run eagerly, as in ddpm.py
    modes.clear()
    assert bench.main([*FAST, *TINY_DDPM, "--compile-samplers"])["compile_samplers"] and len(modes) == 1
    with pytest.raises(SystemExit):
        bench.main([*FAST, "--script", "vae", "--compile-samplers"])
    assert "--compile-samplers applies to --script ddpm" in capsys.readouterr().err
    assert torch.compile is patched and patched is not original
    assert result["compile_mode"] == "reduce-overhead" and result["channels_last"]
    with pytest.raises(SystemExit):
        bench.main([*FAST, *TINY_DDPM, "--compile-mode", "max-autotune"])  # a CPU: no compile by default
    assert "--compile-mode needs torch.compile" in capsys.readouterr().err
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "force_layout_optimization", False)
    assert bench.main([*FAST, *TINY_DDPM, "--compile", "--force-layout"])["force_layout"]
    assert inductor_config.force_layout_optimization
    with pytest.raises(SystemExit):
        bench.main([*FAST, *TINY_DDPM, "--force-layout"])
    assert "--force-layout needs torch.compile" in capsys.readouterr().err
