"""unet.py: shapes for every configuration, and each piece against a direct computation."""
import math

import pytest
import torch

from unet import UNet, channel_shuffle, timestep_embedding

torch.set_num_threads(2)


def tiny(**kw):
    cfg = dict(channels=8, channel_mult=(1, 2), num_blocks=1)
    cfg.update(kw)
    return UNet(**cfg)


def randomize_zero_init(net):
    """The output conv and residual branches start at zero (the net outputs 0 at init);
    perturb every weight so that the conditioning can show in the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("block", ["resnet", "shuffle"])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("time,classes", [(True, None), (False, None), (True, 10), (False, 10)])
def test_shapes(block, size, time, classes):
    net = tiny(block=block, time_conditioning=time, num_classes=classes, channel_mult=(1, 2, 2))
    x = torch.randn(3, 1, size, size)
    t = torch.randint(0, 1000, (3,)) if time else None
    y = torch.tensor([0, 9, 10]) if classes else None  # 10 = "no label"
    assert net(x, t, y).shape == (3, 1, size, size)


def test_any_channels_and_odd_sizes():
    # 3 channels in, 2 out; four levels take 28 -> 14 -> 7 -> 4 and back to exactly 28.
    net = tiny(in_channels=3, out_channels=2, channel_mult=(1, 1, 2, 2))
    assert net(torch.randn(2, 3, 28, 28), torch.tensor([0, 5])).shape == (2, 2, 28, 28)


def test_time_and_label_change_the_output():
    net = randomize_zero_init(tiny(num_classes=10))
    x = torch.randn(2, 1, 28, 28)
    t0, t1 = torch.tensor([0, 0]), torch.tensor([500, 500])
    y0, y1 = torch.tensor([3, 3]), torch.tensor([7, 7])
    base = net(x, t0, y0)
    assert (net(x, t1, y0) - base).abs().max() > 1e-3
    assert (net(x, t0, y1) - base).abs().max() > 1e-3
    # y=None means the "no label" index.
    assert torch.allclose(net(x, t0), net(x, t0, torch.tensor([10, 10])))


def test_output_starts_at_zero():
    # Zero-initialised output layer: an untrained denoiser predicts eps = 0 (the mean).
    net = tiny()
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).abs().max() == 0


def test_timestep_embedding_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim = 6
    emb = timestep_embedding(t, dim)
    for row, tv in enumerate(t.tolist()):
        for i in range(dim // 2):
            w = 10000.0 ** (-i / (dim // 2))
            assert math.isclose(emb[row, i].item(), math.cos(tv * w), abs_tol=1e-5)
            assert math.isclose(emb[row, dim // 2 + i].item(), math.sin(tv * w), abs_tol=1e-5)
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_channel_shuffle_is_the_transpose_permutation():
    groups, per = 3, 4
    x = torch.arange(groups * per).float().view(1, groups * per, 1, 1)
    out = channel_shuffle(x, groups).flatten().tolist()
    # Output channel j*groups + g comes from input group g, position j.
    expected = [float(g * per + j) for j in range(per) for g in range(groups)]
    assert out == expected


def test_shuffle_block_is_lighter():
    resnet = sum(p.numel() for p in UNet(block="resnet").parameters())
    shuffle = sum(p.numel() for p in UNet(block="shuffle").parameters())
    assert shuffle < resnet / 2


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown block"):
        UNet(block="dense")
    with pytest.raises(ValueError, match="divisible"):
        UNet(channels=6, block="shuffle")
    with pytest.raises(ValueError, match="time-conditioned"):
        tiny()(torch.randn(1, 1, 28, 28))
