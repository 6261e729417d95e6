"""Class-conditional DDPM and classifier-free guidance: the guidance arithmetic against
separate network calls, label dropping, the conversions between parameterisations, and the
command line on the fake MNIST."""
import json
import math

import pytest
import torch

import ddpm
from test_ddpm_cli import assert_one_line_error, ddpm_main, load


def tiny_net(seed=0):
    """A small class-conditional U-Net with every weight perturbed (the zero-initialised output
    and conditioning layers too), so that its output depends on x, t and y."""
    torch.manual_seed(seed)
    net = ddpm.build_model({"arch": "resnet", "channels": 8, "channel_mult": "1,2", "num_blocks": 1,
                            "attention": True, "dropout": 0.0, "class_cond": True}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def inputs(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randint(0, 10, (b,), generator=g))


@torch.no_grad()
def test_guidance_against_two_separate_calls():
    net = tiny_net()
    x, t, y = inputs()
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, net.null_label))
    assert (cond - uncond).abs().max() > 1e-3  # the label matters to this network
    for w in (0.5, 1.0, 3.0):
        expected = (1 + w) * cond - w * uncond  # Ho & Salimans eq. 6, from two separate calls
        torch.testing.assert_close(ddpm.guided(net, y, w, net.null_label)(x, t), expected, atol=1e-5, rtol=1e-5)
    # w = 0: p(x | y), w = -1: p(x), up to the round-off of one batched call against two
    torch.testing.assert_close(ddpm.guided(net, y, 0.0, net.null_label)(x, t), cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(ddpm.guided(net, y, -1.0, net.null_label)(x, t), uncond, atol=1e-5, rtol=0)
    torch.testing.assert_close(ddpm.for_labels(net, y, 0.0, net.null_label)(x, t), cond, atol=0, rtol=0)


@torch.no_grad()
def test_guided_batch_is_one_doubled_call():
    net, calls = tiny_net(), []

    def counting(x, t, y):
        calls.append((x.shape[0], y.tolist()))
        return net(x, t, y)
    x, t, y = inputs(b=4)
    ddpm.guided(counting, y, 2.0, net.null_label)(x, t)
    assert net.null_label == 10 and calls == [(8, y.tolist() + [10] * 4)]  # after the digits 0..9


@torch.no_grad()
def test_no_label_means_the_unconditional_model():
    """The dropped label is one fixed embedding: the output then ignores which digit it was,
    and a call without labels is that same model."""
    net = tiny_net()
    x, t, _ = inputs(b=3)
    none = torch.full((3,), net.null_label)
    torch.testing.assert_close(net(x, t, none), net(x, t), atol=0, rtol=0)
    dropped = ddpm.drop_labels(torch.tensor([0, 5, 9]), 1.0, net.null_label)
    torch.testing.assert_close(net(x, t, dropped), net(x, t), atol=0, rtol=0)


def test_drop_rate_and_no_drop_at_sampling():
    y = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.2):
        dropped = ddpm.drop_labels(y, p, 10, generator=torch.Generator().manual_seed(1))
        rate = (dropped == 10).float().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(y)), rate
        kept = dropped != 10
        assert torch.equal(dropped[kept], y[kept])  # a label is dropped or left alone, never changed
    assert torch.equal(ddpm.drop_labels(y, 0.0, 10), y)
    seen = []  # sampling: every call gets the labels asked for
    fn = ddpm.for_labels(lambda x, t, yy: seen.append(yy.clone()) or torch.zeros_like(x), torch.arange(5), 0.0, 10)
    ddpm.sample(fn, ddpm.make_schedule("linear", 10), 5, "eps", "ddim", steps=3)
    assert len(seen) == 3 and all(torch.equal(s, torch.arange(5)) for s in seen)


@pytest.mark.parametrize("parameterization", ["x0", "v"])
@torch.no_grad()
def test_guiding_any_parameterisation_is_guiding_eps(parameterization):
    """Combine the raw outputs, then convert to eps; or convert each, then combine: the same."""
    net, sched = tiny_net(), ddpm.make_schedule("linear", 1000)
    x, t, y = inputs()
    w = 2.5
    eps_of = lambda out: ddpm.predict_x0_eps(sched, x, t, out, parameterization)[1]  # noqa: E731
    guided_then_converted = eps_of(ddpm.guided(net, y, w, net.null_label)(x, t))
    converted_then_guided = (1 + w) * eps_of(net(x, t, y)) - w * eps_of(net(x, t, torch.full_like(y, net.null_label)))
    torch.testing.assert_close(guided_then_converted, converted_then_guided, atol=1e-4, rtol=1e-4)


# --- the command line ----------------------------------------------------------------------

def test_class_cond_trains_resumes_and_evaluates(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    common = ("--eval-images", "1", "--num-samples", "20", "--sample-every", "5", "--sampler", "ddim", "--sample-steps", "2")
    proc = ddpm_main(capsys, fake_mnist, out, "--class-cond", "--guidance", "1", "--max-steps", "3", *common)
    assert proc.returncode == 0, proc.stderr
    assert "labels (dropped with p=0.1)" in proc.stdout and "label dropped" in proc.stdout
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["test_bpd"] > 0 and metrics["test_bpd_uncond"] > 0
    ckpt = load(out / "ckpt.pt")
    assert ckpt["config"]["class_cond"] and "label_emb.weight" in ckpt["ema"]
    from PIL import Image
    assert Image.open(out / "samples_step_000003.png").size == (2 * 30 + 2, 10 * 30 + 2)  # 10 rows of 20 // 10
    proc = ddpm_main(capsys, fake_mnist, out, "--resume", "--max-steps", "5", *common)  # no --class-cond: kept
    assert proc.returncode == 0, proc.stderr
    assert load(out / "ckpt.pt")["config"]["class_cond"] and "label dropped" in proc.stdout
    proc = ddpm_main(capsys, fake_mnist, out, "--eval-only", "--guidance", "2", "--eval-images", "0")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--guidance", "2"], "--class-cond"),
    (["--class-cond", "--p-uncond", "1"], "--p-uncond"),
    (["--class-cond", "--p-uncond", "-0.1"], "--p-uncond"),
])
def test_bad_conditional_flags(capsys, fake_mnist, tmp_path, args, needle):
    assert_one_line_error(ddpm_main(capsys, fake_mnist, tmp_path / "run", *args), needle)


def test_guidance_on_an_unconditional_checkpoint(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    assert ddpm_main(capsys, fake_mnist, out, "--max-steps", "1", "--eval-images", "0").returncode == 0
    assert_one_line_error(ddpm_main(capsys, fake_mnist, out, "--eval-only", "--guidance", "2"), "unconditional")
    assert_one_line_error(ddpm_main(capsys, fake_mnist, out, "--resume", "--guidance", "2", "--max-steps", "2"),
                          "unconditional")
