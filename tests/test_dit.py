"""unet.py's Diffusion Transformer: patches, positions, adaLN-Zero, labels, and a few training steps.

Each piece is checked against a direct computation written out here (loops over patches,
the position formula in plain math), or against a property that a wrong implementation
would break (exact inverses, identity at initialisation, permutation equivariance).
"""
import json
import math

import numpy as np
import pytest
import torch

from conftest import _stroke_digit, run_in_process
from unet import DiT, DiTBlock, LabelEmbedding, UNet, patchify, sincos_position_embedding, unpatchify

torch.set_num_threads(2)


def tiny(**kw):
    cfg = dict(width=32, depth=2, heads=4, patch_size=4)
    cfg.update(kw)
    return DiT(**cfg)


def randomize(module, scale=0.1, seed=1):
    """Add noise to every weight: the zero-initialised layers (gates, final layer) then let
    the input, the time and the label show in the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


# ---- patches ------------------------------------------------------------------------------

@pytest.mark.parametrize("size,p", [(28, 2), (28, 4), (32, 2), (32, 4)])
def test_unpatchify_inverts_patchify(size, p):
    x = torch.randn(2, 3, size, size)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (size // p) ** 2, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 3, size, size), x)
    # And the other way round: any token tensor comes back unchanged.
    tokens = torch.randn(2, (size // p) ** 2, p * p * 3)
    assert torch.equal(patchify(unpatchify(tokens, p, 3, size, size), p), tokens)


def test_patchify_against_a_loop_over_patches():
    # 2 channels, 4x6 image, p = 2: a 2x3 grid of patches, distinct values everywhere.
    C, H, W, p = 2, 4, 6, 2
    x = torch.arange(C * H * W, dtype=torch.float32).view(1, C, H, W)
    tokens = patchify(x, p)
    expected = []
    for i in range(H // p):                # patch rows, top to bottom
        for j in range(W // p):            # then patch columns, left to right
            expected.append([x[0, c, i * p + a, j * p + q].item()
                             for a in range(p) for q in range(p) for c in range(C)])
    assert tokens[0].tolist() == expected


def test_indivisible_sizes_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 28, 28), 3)
    with pytest.raises(ValueError, match="divisible"):
        unpatchify(torch.zeros(1, 4, 9), 3, 1, 28, 28)
    with pytest.raises(ValueError, match="patch size"):
        DiT(image_size=28, patch_size=3, width=32)
    with pytest.raises(ValueError, match="heads"):
        DiT(width=32, heads=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(width=30, heads=3)
    with pytest.raises(ValueError, match="divisible"):
        tiny()(torch.zeros(1, 1, 30, 30), torch.tensor([0]))


def test_patch_embedding_is_patchify_then_linear():
    # The stride-p convolution is one linear map per patch: the same numbers as patchify and
    # a Linear whose weight is the kernel read in patchify's (row, column, channel) order.
    net = tiny(in_channels=3, patch_size=4)
    x = torch.randn(2, 3, 28, 28)
    conv = net.patch_embed(x).flatten(2).transpose(1, 2)              # (B, N, width)
    weight = net.patch_embed.weight.permute(0, 2, 3, 1).reshape(32, -1)  # (width, p*p*C)
    linear = patchify(x, 4) @ weight.T + net.patch_embed.bias
    assert torch.allclose(conv, linear, atol=1e-5)


# ---- the network ----------------------------------------------------------------------------

@pytest.mark.parametrize("size,p", [(28, 2), (28, 4), (32, 2), (32, 4)])
@pytest.mark.parametrize("classes", [None, 10])
def test_shapes(size, p, classes):
    # image_size stays 28: a 32x32 input gets its own position table.
    net = tiny(patch_size=p, num_classes=classes, in_channels=2, out_channels=3)
    x = torch.randn(3, 2, size, size)
    t = torch.tensor([0, 50, 99])
    y = torch.tensor([0, 9, 10]) if classes else None  # 10 = "no label"
    assert net(x, t, y).shape == (3, 3, size, size)


def test_output_starts_at_zero_and_blocks_at_the_identity():
    torch.manual_seed(0)
    net = tiny(num_classes=10)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 70])
    assert torch.equal(net(x, t, torch.tensor([1, 2])), torch.zeros(2, 1, 28, 28))
    tokens, c = torch.randn(2, 49, 32), torch.randn(2, 32)
    for block in net.blocks:
        assert torch.equal(block(tokens, c), tokens)
    # Filling the zero-initialised layers with random numbers must break both, or the
    # checks above could not fail.
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in [b.modulation[1] for b in net.blocks] + [net.final.modulation[1], net.final.linear]:
            for p in layer.parameters():
                p.copy_(0.1 * torch.randn_like(p))
    assert net(x, t, torch.tensor([1, 2])).abs().max() > 1e-3
    for block in net.blocks:
        assert (block(tokens, c) - tokens).abs().max() > 1e-3


def test_position_embedding_formula():
    gh, gw, dim = 3, 4, 8
    emb = sincos_position_embedding(gh, gw, dim)
    assert emb.shape == (gh * gw, dim)
    quarter = dim // 4
    for n in range(gh * gw):
        i, j = divmod(n, gw)  # row-major, as patchify numbers the patches
        expected = ([math.sin(i / 10000 ** (k / quarter)) for k in range(quarter)]
                    + [math.cos(i / 10000 ** (k / quarter)) for k in range(quarter)]
                    + [math.sin(j / 10000 ** (k / quarter)) for k in range(quarter)]
                    + [math.cos(j / 10000 ** (k / quarter)) for k in range(quarter)])
        assert emb[n].tolist() == pytest.approx(expected, abs=1e-6)
    # Distinct positions, distinct vectors (no two rows equal).
    dist = torch.cdist(emb, emb) + torch.eye(gh * gw)
    assert dist.min() > 1e-3
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(3, 4, 6)


def test_the_network_uses_the_table_of_its_grid():
    net = tiny(patch_size=2, image_size=28)
    assert torch.equal(net.pos_embed, sincos_position_embedding(14, 14, 32))
    assert "pos_embed" not in net.state_dict()  # fixed: recomputed, never saved
    assert torch.equal(net.position_embedding(16, 16), sincos_position_embedding(16, 16, 32))


def test_block_is_equivariant_to_token_permutations():
    # Without position embeddings a Transformer block cannot tell tokens apart: permuting
    # the tokens permutes its output. Random modulation, so that it is not the identity.
    torch.manual_seed(0)
    block = randomize(DiTBlock(32, heads=4), scale=0.2)
    x, c = torch.randn(2, 49, 32), torch.randn(2, 32)
    perm = torch.randperm(49)
    out = block(x, c)
    assert (out - x).abs().max() > 1e-2
    assert torch.allclose(block(x[:, perm], c), out[:, perm], atol=1e-5)


# ---- labels ---------------------------------------------------------------------------------

def test_null_label_and_labels_change_the_output():
    torch.manual_seed(0)
    net = randomize(tiny(num_classes=10))
    assert net.null_label == 10 and tiny().null_label is None
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    assert torch.equal(net(x, t), net(x, t, torch.full((2,), net.null_label)))
    out3, out7 = net(x, t, torch.tensor([3, 3])), net(x, t, torch.tensor([7, 7]))
    assert (out3 - out7).abs().max() > 1e-3
    assert (out3 - net(x, t)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no class conditioning"):
        tiny()(x, t, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="time-conditioned"):
        net(x)


def test_label_embedding_rows_and_null():
    emb = LabelEmbedding(10, 6)
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape == (11, 6) and emb.null_label == 10
    x = torch.zeros(3, 1, 28, 28)
    assert torch.equal(emb.embed(None, x), emb.weight[10].expand(3, 6))
    assert torch.equal(emb.embed(torch.tensor([0, 4, 10]), x), emb.weight[[0, 4, 10]])


def test_unet_keeps_its_label_embedding_key():
    torch.manual_seed(0)
    net = UNet(channels=8, channel_mult=(1, 2), num_blocks=1, num_classes=10)
    sd = net.state_dict()
    assert sd["label_emb.weight"].shape == (11, 32)  # emb_dim = 4 * channels
    assert net.null_label == 10
    assert UNet(channels=8, channel_mult=(1, 2), num_blocks=1).null_label is None
    # A checkpoint saved under the old key loads as before.
    net.load_state_dict({k: v.clone() for k, v in sd.items()})
    randomize(net)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    assert torch.equal(net(x, t), net(x, t, torch.full((2,), 10)))


# ---- it learns ------------------------------------------------------------------------------

def test_a_few_steps_lower_the_diffusion_loss():
    import ddpm

    rng = np.random.default_rng(0)
    digits = np.stack([_stroke_digit(int(y), rng) for y in rng.integers(0, 10, size=32)])
    x0 = torch.from_numpy(digits).float().div(127.5).sub(1).unsqueeze(1)  # (32, 1, 28, 28) in [-1, 1]
    sched = ddpm.make_schedule("cosine", 100)
    torch.manual_seed(0)
    net = tiny(patch_size=4, width=32, depth=2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def loss(seed):
        return ddpm.diffusion_loss(net, sched, x0, "v", torch.Generator().manual_seed(seed))[0].mean()

    with torch.no_grad():
        before = loss(1234).item()
    for step in range(60):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        after = loss(1234).item()
    assert after < 0.75 * before, (before, after)  # about 0.45 -> 0.27


# ---- ddpm.py --arch dit: everything the U-Net runs -----------------------------------------

DIT_TINY = ["--arch", "dit", "--patch-size", "4", "--width", "32", "--depth", "2", "--heads", "2", "--timesteps", "20",
            "--batch-size", "8", "--log-every", "2", "--num-samples", "10", "--sample-steps", "4", "--device", "cpu"]


def run_main(module, argv, capsys):
    return run_in_process(module.main, argv, capsys)


def test_ddpm_trains_resumes_evaluates_and_samples_a_class_conditional_dit(fake_mnist, classifier, tmp_path, capsys):
    import ddpm
    import sample
    out = tmp_path / "dit"
    common = ["--data-dir", fake_mnist, "--out-dir", out, *DIT_TINY, "--class-cond", "--eval-images", "2"]
    code, log, err = run_main(ddpm, [*common, "--max-steps", "3"], capsys)
    assert code == 0, err
    assert "DiT, patch 4, 2 x 32, 2 heads" in log and "bits/dim" in log
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["arch"] == "dit" and ckpt["step"] == 3
    assert any(k.startswith("blocks.1.modulation") for k in ckpt["model"]) and "label_emb.weight" in ckpt["ema"]
    code, log, err = run_main(ddpm, [*common, "--max-steps", "5", "--resume"], capsys)
    assert code == 0 and "resumed at step 3" in log, err
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 5
    code, log, err = run_main(ddpm, ["--data-dir", fake_mnist, "--out-dir", out, "--eval-only", "--eval-images", "2",
                                     "--num-samples", "10", "--sample-steps", "4", "--guidance", "1",
                                     "--score-samples", "20", "--classifier", classifier], capsys)
    assert code == 0 and "bound of -log p(x | y)" in log, err
    assert json.load(open(out / "eval.json"))["score"]["n"] == 20  # score.py's figures of the DiT's samples
    code, log, err = run_main(sample, ["--ckpt", out / "ckpt.pt", "--n", "4", "--out", tmp_path / "grid.png",
                                       "--sample-steps", "3", "--guidance", "2", "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "grid.png").exists(), err
    code, log, err = run_main(sample, ["--ckpt", out / "ckpt.pt", "--inpaint", "bottom", "--data-dir", fake_mnist,
                                       "--n", "2", "--completions", "2", "--resample", "2", "--sample-steps", "3",
                                       "--out", tmp_path / "inpaint.png", "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "inpaint.png").exists(), err


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "dit", "--channels", "16"], "--channels is a flag of --arch unet, not of --arch dit"),
    (["--arch", "dit", "--no-attention"], "--attention is a flag of --arch unet"),
    (["--patch-size", "4"], "--patch-size is a flag of --arch dit, not of --arch unet"),
    (["--arch", "dit", "--patch-size", "5"], "--patch-size must divide 28"),
    (["--arch", "dit", "--width", "30", "--heads", "4"], "must split into --heads 4"),
])
def test_a_flag_of_the_other_backbone_is_refused_in_one_line(fake_mnist, tmp_path, capsys, argv, needle):
    import ddpm
    code, _, err = run_main(ddpm, ["--data-dir", fake_mnist, "--out-dir", tmp_path / "run", *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_dit_still_builds_its_unet():
    """Until the DiT, --arch named the U-Net's block ("resnet" or "shuffle"), and there was no --block."""
    import ddpm
    old = {"arch": "shuffle", "channels": 8, "channel_mult": "1,2", "num_blocks": 1, "attention": False, "dropout": 0.0,
           "class_cond": False}
    net = ddpm.build_model(old)
    new = ddpm.build_model({**old, "arch": "unet", "block": "shuffle"})
    assert isinstance(net, UNet) and type(net.down[0][0]).__name__ == "ShuffleBlock"
    assert [(k, v.shape) for k, v in net.state_dict().items()] == [(k, v.shape) for k, v in new.state_dict().items()]
