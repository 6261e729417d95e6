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
    argv = [*FAST, *TINY_DDPM, "--ancestral", "--json", str(tmp_path / "b.json")]
    result = bench.main(argv)
    out = capsys.readouterr().out
    assert result["flags"] == argv  # all of them: check.sh's summary tells the runs apart by these
    assert json.load(open(tmp_path / "b.json")) == json.loads(json.dumps(result))
    assert result["batch_size"] == 4 and result["steps"] == 2 and result["warmup_steps"] == 1
    assert result["train_images_per_sec"] == pytest.approx(4 * 2 / (result["ms_per_step"] * 2 / 1000))
    assert set(result["samplers"]) == {"DDIM-10, eta 1", "ancestral (10 steps)"}  # DDIM: min(50, T) steps
    assert all(s["n"] == 3 and s["sample_images_per_sec"] > 0 for s in result["samplers"].values())
    assert result["mfu"] is None and "MFU: no peak FLOP/s known for cpu" in out  # a CPU has no entry
    net = ddpm.build_model(vars(ddpm.parse_args(["--data-dir", "x", *TINY_DDPM])))
    assert result["parameters"] == sum(p.numel() for p in net.parameters())


def test_several_sample_sizes():
    """--sample-n 3,5: DDIM at each batch size, with its warm-up time; ancestral at the first only."""
    result = bench.main([*FAST[:-1], "5,3", *TINY_DDPM, "--ancestral"])
    samplers = result["samplers"]
    assert list(samplers) == ["DDIM-10, eta 1", "DDIM-10, eta 1, n=3", "ancestral (10 steps)"]
    assert [s["n"] for s in samplers.values()] == [5, 3, 5]
    assert samplers["DDIM-10, eta 1, n=3"]["warmup_seconds"] > 0


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
                                          (["--profile", "-1"], "--profile must be >= 0"),
                                          (["--sample-n", "100,0"], "--sample-n: must be positive integers"),
                                          (["--bf16-weights", "--device", "cpu"], "--bf16-weights replaces autocast's casts: pass --amp"),
                                          (["--script", "vae", "--bf16-weights"], "--bf16-weights applies to --script ddpm"),
                                          (["--script", "gan"], "invalid choice"),
                                          (["--channels", "zero"], "--channels")])
def test_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench.py: error: ") and needle in err[0], err


def test_speed_experiment_flags(monkeypatch, capsys):
    """--compile-mode reaches torch.compile (recorded here, not run: compiling takes a minute on a
    CPU) and is undone afterwards; --channels-last runs, and puts the sampling network in NHWC too."""
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
    built = []
    monkeypatch.setitem(bench.PARTS, "ddpm", lambda *a, **kw: built.append(bench.ddpm_parts(*a, **kw)) or built[-1])
    bench.main([*FAST, *TINY_DDPM, "--channels-last"])
    for net in (built[0]["net"], built[0]["sampling_net"]):  # the trained network and its EMA copy
        kernels = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert not all(p.is_contiguous() for p in kernels)
    with pytest.raises(SystemExit):
        bench.main([*FAST, *TINY_DDPM, "--compile-mode", "max-autotune"])  # a CPU: no compile by default
    assert "--compile-mode needs torch.compile" in capsys.readouterr().err
    import torch._inductor.config as inductor_config
    seen = []  # the flag as the compiled network sees it: on inside the run, as it was after it
    monkeypatch.setitem(bench.PARTS, "ddpm", lambda *a, **kw: seen.append(inductor_config.force_layout_optimization)
                        or bench.ddpm_parts(*a, **kw))
    with inductor_config.patch(force_layout_optimization=False):  # torch's own patch (see test_train_step)
        assert bench.main([*FAST, *TINY_DDPM, "--compile", "--force-layout"])["force_layout"]
        assert seen == [True] and inductor_config.force_layout_optimization is False
    with pytest.raises(SystemExit):
        bench.main([*FAST, *TINY_DDPM, "--force-layout"])
    assert "--force-layout needs torch.compile" in capsys.readouterr().err


@pytest.mark.parametrize("name, kind", [
    # names of the forms that cuDNN, cuBLAS, ATen and inductor give their CUDA kernels, and CPU ops
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x64", "convolutions"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw", "convolutions"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false>",
     "cuDNN's NCHW<->NHWC transposes"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>", "GroupNorm"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>", "casts and copies"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer, EMA and clipping"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNN", "matrix products"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("triton_poi_fused__to_copy_convolution_0", "torch.compile's fused kernels"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(...)>", "elementwise and other"),
    ("aten::mkldnn_convolution", "convolutions"), ("aten::bmm", "matrix products"), ("aten::addmm", "matrix products"),
    ("aten::native_group_norm_backward", "GroupNorm"), ("aten::_foreach_mul_", "optimizer, EMA and clipping"),
    ("aten::copy_", "casts and copies"), ("aten::randn", "random numbers"), ("aten::silu", "elementwise and other"),
])
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


def test_the_profile_of_the_step(capsys):
    """On a CPU the profile counts torch's ops: one convolution backward per Conv2d of the network
    per step, and its kinds add up to its total."""
    result = bench.main([*FAST, *TINY_DDPM, "--profile", "2"])
    profile = result["profile"]
    assert profile["steps"] == 2 and profile["what"] == "torch ops' CPU time"
    assert sum(profile["by_kind_ms_per_step"].values()) == pytest.approx(profile["ms_per_step"])
    assert profile["by_kind_ms_per_step"]["convolutions"] > 0
    rows = {row["name"]: row for row in profile["top"]}
    net = ddpm.build_model(vars(ddpm.parse_args(["--data-dir", "x", *TINY_DDPM])))
    assert rows["aten::convolution_backward"]["calls_per_step"] == sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    ms = [row["ms_per_step"] for row in profile["top"]]
    assert ms == sorted(ms, reverse=True) and len(ms) == 12
    assert "profile of 2 steps" in capsys.readouterr().out


def test_bf16_weights_compute_what_autocast_computes():
    """bench.BF16Weights casts the convolution and linear parameters itself, once per call:
    the same output and the same fp32 gradients as bf16 autocast casting each layer's weights,
    with two casts (_to_copy) per such parameter fewer: one forward, one for its gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    config = ddpm.parse_args(["--data-dir", "x", *TINY_DDPM, "--attention"])
    torch.manual_seed(0)
    net = ddpm.build_model(vars(config))
    for p in net.parameters():  # the zero-initialised output layers would hide the weights' role
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    results = []
    for model in (net, bench.BF16Weights(net)):
        net.zero_grad(set_to_none=True)
        with Casts() as casts, torch.autocast("cpu", torch.bfloat16):
            out = model(x, t)
            out.float().square().sum().backward()
        results.append((out, [p.grad.clone() for p in net.parameters()], casts.n))
    (out_a, grads_a, casts_a), (out_b, grads_b, casts_b) = results
    assert out_a.dtype == out_b.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
    assert all(g.dtype == torch.float32 for g in grads_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert casts_a - casts_b == 2 * len(bench.BF16Weights(net).names), (casts_a, casts_b)  # forward and backward


def test_ddpm_figures_of_the_dit():
    """--arch dit goes through bench.py as the U-Net does: its parameters, and a FLOP count that
    grows with the depth by exactly one block's cost (the same block each time)."""
    dit = ["--arch", "dit", "--patch-size", "4", "--width", "32", "--heads", "2", "--timesteps", "10",
           "--batch-size", "4", "--device", "cpu"]
    results = [bench.main([*FAST, *dit, "--depth", str(depth)]) for depth in (1, 2, 3)]
    net = ddpm.build_model(vars(ddpm.parse_args(["--data-dir", "x", *dit, "--depth", "1"])))
    assert results[0]["parameters"] == sum(p.numel() for p in net.parameters())
    flops = [r["train_flops_per_image"] for r in results]
    assert flops[0] > 0 and flops[2] - flops[1] == pytest.approx(flops[1] - flops[0], rel=1e-9)
