"""
unet.py: a time-conditioned U-Net, the one network shared by the project's scripts.

A U-Net maps an image to an image of the same size. It goes down through a few
resolutions (28 -> 14 -> 7 for MNIST), keeping the feature maps of each level, comes back
up, and at each level concatenates the kept maps (the "skip connections") to what comes
up. The down path sees the whole digit at low resolution; the skips carry the fine detail
that the bottleneck would lose. This is the network of Ho et al. 2020 (DDPM, appendix B):
the backbone of PixelCNN++ (Salimans et al. 2017), a U-Net (Ronneberger et al. 2015) of
Wide-ResNet blocks (Zagoruyko & Komodakis 2016), to which Ho et al. added group normalisation
and self-attention; here in the shape improved-diffusion (Nichol & Dhariwal 2021) uses:

    stem conv -> [blocks (+ attention) -> downsample] x levels -> middle -> [blocks -> upsample] x levels -> out conv

A diffusion model asks one network to denoise at every noise level t, so the network is
told t: a sinusoidal embedding of t (as the positions of a Transformer), passed through a
small MLP, enters every residual block as a per-channel scale and shift of its features
(FiLM; "scale-shift norm" of improved-diffusion).

Options, all used by the project:
- `block="resnet"`: the standard residual block, two 3x3 convolutions.
- `block="shuffle"`: a ShuffleNet-style block (Zhang et al. 2018): grouped 1x1 convolutions
  with a channel shuffle between them around a depthwise 3x3 convolution. It has several
  times fewer weights and FLOPs per block, for a lighter, faster network.
- `time_conditioning=False`: a plain image-to-image U-Net, called as `net(x)`
  (vae_no_encoder.py denoises at a single fixed noise level).
- `num_classes=K`: class conditioning. A label embedding is added to the time embedding;
  label K means "no label", so one network can be trained with labels dropped at random
  and sampled with classifier-free guidance (Ho & Salimans 2022).
- Self-attention at the lowest resolution (7x7 on MNIST: 49 positions, cheap).

Shapes: x is (B, C, H, W) with any H, W (28 and 32 both work; upsampling goes back to the
exact size of the matching skip), t is (B,) integers or floats, y is (B,) integers.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5; DDPM appendix B).

    emb(t)[i] = cos(t * w_i), emb(t)[half + i] = sin(t * w_i),  w_i = max_period^(-i / half)

    Frequencies go from 1 (changes every step) to 1/max_period (changes over the whole
    range), so nearby timesteps get similar vectors and far ones different vectors.
    t: (B,) -> (B, dim), computed in float32 whatever the autocast dtype.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:  # odd dim: pad one zero column
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels):
    # 32 groups as in DDPM when the width allows it; fewer for the narrow networks used on CPU.
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


def zero_init(module):
    """Zero a layer's weights so the residual branch starts as the identity (improved-diffusion):
    a deep stack of blocks then starts as a shallow network and trains stably."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def apply_embedding(h, norm, emb_proj, emb):
    """Normalize h and inject the conditioning vector emb as a scale and shift (FiLM):
        h = GroupNorm(h) * (1 + scale(emb)) + shift(emb)
    With no conditioning (emb is None) this is just GroupNorm(h).
    h: (B, C, H, W), emb: (B, E) -> (B, C, H, W)
    """
    if emb is None:
        return norm(h)
    scale, shift = emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> broadcast over H, W
    return norm(h) * (1 + scale) + shift


def embedding_projection(emb_dim, channels):
    """emb -> per-channel (scale, shift), 2C numbers; None for a block without conditioning."""
    if emb_dim is None:
        return None
    return nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * channels))


class ResBlock(nn.Module):
    """Residual block: x + conv(drop(act(norm'(conv(act(norm(x))))))), norm' conditioned on emb."""

    def __init__(self, in_ch, out_ch, emb_dim=None, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = embedding_projection(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # A 1x1 conv matches the channel count of the skip path when the block changes it.
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        h = apply_embedding(h, self.norm2, self.emb_proj, emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def channel_shuffle(x, groups):
    """ShuffleNet's channel shuffle: (B, g*n, H, W) -> view (B, g, n) -> transpose -> (B, n*g).

    After a grouped convolution each output group has seen only its own input group; the
    shuffle hands every group a slice of every other, so the next grouped conv mixes them.
    """
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet-style residual block (Zhang et al. 2018, fig. 2b, with GroupNorm + SiLU):

        act(norm(x)) -> 1x1 grouped conv -> channel shuffle -> 3x3 depthwise conv
        -> norm conditioned on emb -> act -> dropout -> 1x1 grouped conv (zero-init) -> + skip

    Weights of a 3x3 ResBlock conv: 9*C^2. Here: 2*C^2/g + 9*C, about 9g times fewer.
    """

    def __init__(self, in_ch, out_ch, emb_dim=None, dropout=0.0, groups=4):
        super().__init__()
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"ShuffleBlock: channels {in_ch}->{out_ch} must be divisible by groups={groups}")
        self.groups = groups
        self.norm1 = group_norm(in_ch)
        self.pw1 = nn.Conv2d(in_ch, out_ch, 1, groups=groups)
        self.dw = nn.Conv2d(out_ch, out_ch, 3, padding=1, groups=out_ch)
        self.emb_proj = embedding_projection(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.pw2 = zero_init(nn.Conv2d(out_ch, out_ch, 1, groups=groups))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb=None):
        h = self.pw1(F.silu(self.norm1(x)))
        h = self.dw(channel_shuffle(h, self.groups))
        h = apply_embedding(h, self.norm2, self.emb_proj, emb)
        h = self.pw2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, residual.

    softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017) via F.scaled_dot_product_attention,
    which picks a fused kernel (flash / memory-efficient) when one applies.
    """

    def __init__(self, channels, heads=4):
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (28 -> 14 -> 7; odd sizes round up: 7 -> 4)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the size of the matching skip, then a 3x3 conv.

    Going to the skip's exact size (rather than x2) is what lets 7 -> 4 -> 7 work."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """Time-conditioned U-Net.

    in_channels / out_channels: image channels (1 for MNIST).
    channels: width of the first level; level i has channels * channel_mult[i].
    num_blocks: residual blocks per level on the way down (one more on the way up, which
        also consumes the downsampling skip, as in DDPM).
    attention: self-attention after the blocks of the lowest resolution and in the middle.
    block: "resnet" or "shuffle".
    time_conditioning: False gives a plain U-Net called as net(x).
    num_classes: if set, net(x, t, y) with y in [0, num_classes]; y = num_classes is "no label".
    """

    def __init__(self, in_channels=1, out_channels=1, channels=32, channel_mult=(1, 2, 4), num_blocks=2,
                 attention=True, heads=4, dropout=0.0, block="resnet", time_conditioning=True,
                 num_classes=None):
        super().__init__()
        if block not in ("resnet", "shuffle"):
            raise ValueError(f"unknown block type {block!r}: use 'resnet' or 'shuffle'")
        Block = ResBlock if block == "resnet" else ShuffleBlock
        self.channels = channels
        self.time_conditioning = time_conditioning
        self.num_classes = num_classes

        # Conditioning: sinusoidal(t) -> Linear -> SiLU -> Linear, width 4 * channels (DDPM).
        emb_dim = None
        if time_conditioning or num_classes is not None:
            emb_dim = 4 * channels
        if time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)  # index num_classes = "no label"

        def make_block(cin, cout):
            return Block(cin, cout, emb_dim=emb_dim, dropout=dropout)

        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        # Down path. skip_ch records the width of every feature map pushed for the up path.
        self.down = nn.ModuleList()
        skip_ch = [channels]
        ch = channels
        last = len(channel_mult) - 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                layers = [make_block(ch, channels * mult)]
                ch = channels * mult
                if attention and level == last:
                    layers.append(SelfAttention(ch, heads))
                self.down.append(nn.ModuleList(layers))
                skip_ch.append(ch)
            if level != last:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_ch.append(ch)

        # Middle, at the lowest resolution: block, attention, block.
        self.middle = nn.ModuleList([make_block(ch, ch)] + ([SelfAttention(ch, heads)] if attention else [])
                                    + [make_block(ch, ch)])

        # Up path: each block takes the concatenation [h, skip] and is followed, at the end
        # of a level (except the top), by an upsampling to the next skip's size.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_blocks + 1):
                layers = [make_block(ch + skip_ch.pop(), channels * mult)]
                ch = channels * mult
                if attention and level == last:
                    layers.append(SelfAttention(ch, heads))
                if level != 0 and i == num_blocks:
                    layers.append(Upsample(ch))
                self.up.append(nn.ModuleList(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def embed(self, x, t, y):
        """The conditioning vector (B, 4*channels), or None for a plain U-Net."""
        emb = None
        if self.time_conditioning:
            if t is None:
                raise ValueError("this U-Net is time-conditioned: call it as net(x, t)")
            emb = self.time_mlp(timestep_embedding(t, self.channels))
        if self.num_classes is not None:
            if y is None:  # unconditional call: the "no label" embedding
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = self.label_emb(y) if emb is None else emb + self.label_emb(y)
        return emb

    def forward(self, x, t=None, y=None):
        emb = self.embed(x, t, y)
        h = self.stem(x)
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for layers in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in layers:
                if isinstance(layer, Upsample):
                    h = layer(h, size=skips[-1].shape[-2:])
                else:
                    h = layer(h, emb)
        return self.out(h)
