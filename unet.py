"""
unet.py: the project's two denoisers, a time-conditioned U-Net and a Diffusion Transformer (DiT).

Both map an image to an image of the same size and are called the same way,
net(x, t, y=None): x (B, C, H, W), t (B,) timesteps, y (B,) labels or None. A script picks
one and never needs to know which it holds: both expose `null_label` (the "no label" index,
or None without class conditioning), and both output exactly zero at initialisation.

The U-Net
---------
A U-Net goes down through a few resolutions (28 -> 14 -> 7 for MNIST), keeping the feature
maps of each level, comes back up, and at each level concatenates the kept maps (the "skip
connections") to what comes up. The down path sees the whole digit at low resolution; the
skips carry the fine detail that the bottleneck would lose. This is the network of Ho et al.
2020 (DDPM, appendix B): the backbone of PixelCNN++ (Salimans et al. 2017), a U-Net
(Ronneberger et al. 2015) of Wide-ResNet blocks (Zagoruyko & Komodakis 2016), to which Ho et
al. added group normalisation and self-attention; here in the shape improved-diffusion
(Nichol & Dhariwal 2021) uses:

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

The Diffusion Transformer (Peebles & Xie 2023)
----------------------------------------------
DiT drops the convolutions: it cuts the image into p x p patches, treats each patch as a
token, and runs a plain Vision Transformer (Dosovitskiy et al. 2021) over the tokens:

    patchify + linear (+ fixed 2-D sin-cos positions) -> depth x DiTBlock(c) -> final layer(c) -> unpatchify

The conditioning vector c = MLP(sinusoidal(t)) + label_embedding(y) is not a token: it
enters every block through adaptive layer norm ("adaLN-Zero", DiT sec. 3.2): from c each
block regresses the shift and scale of its layer norms and a gate on each residual branch,
the gates initialised to zero so that every block starts as the identity. A 28x28 digit at
p = 2 is 196 tokens, at p = 4 it is 49; attention costs grow with the square of the token
count, which is why the patch size is one of the paper's two compute knobs, with the
model size (sec. 4).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of the timestep (Vaswani et al. 2017, sec. 3.5; DDPM appendix B).

    emb(t)[i] = cos(t * w_i), emb(t)[half + i] = sin(t * w_i),  w_i = max_period^(-i / half)

    Frequencies go from w_0 = 1 (changes every step) down to w_{half-1} = max_period^(-(half - 1)/half)
    (changes over the whole range; 1.8e-4 for half = 16, just above 1/max_period), so nearby
    timesteps get similar vectors and far ones different vectors.
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
    """Zero a layer's weights (improved-diffusion): the residual branch it ends starts at zero,
    so its block starts as the identity, and a deep stack of blocks starts as a shallow network
    and trains stably."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LabelEmbedding(nn.Embedding):
    """A learned vector per class, plus one more row for "no label" (Ho & Salimans 2022, sec. 3.2).

    Rows 0..K-1 are the K classes; row K (`null_label`) stands for the unconditional model.
    Training replaces a random fraction of the labels by K, so one network learns both
    eps(x_t, t, y) and eps(x_t, t); classifier-free guidance then mixes the two at sampling.
    A subclass of nn.Embedding, so that its weight keeps the state_dict key `<name>.weight`.
    """

    def __init__(self, num_classes, dim):
        super().__init__(num_classes + 1, dim)
        self.null_label = num_classes

    def embed(self, y, x):
        """The embedding of y (B,), or of the null label for every image of x when y is None. -> (B, dim)"""
        if y is None:
            y = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        return self(y)


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

    Weights of a ResBlock: two 3x3 convs, 2 * 9*C^2. Here: two grouped 1x1 convs and a depthwise
    3x3, 2*C^2/g + 9*C: about 9g times fewer than the ResBlock (4.5g times fewer than one of its convs).
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
        self.null_label = num_classes  # the "no label" index (None: no class conditioning)

        # Conditioning: sinusoidal(t) -> Linear -> SiLU -> Linear, width 4 * channels (DDPM).
        emb_dim = None
        if time_conditioning or num_classes is not None:
            emb_dim = 4 * channels
        if time_conditioning:
            self.time_mlp = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = LabelEmbedding(num_classes, emb_dim)

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
            label = self.label_emb.embed(y, x)  # y=None: the "no label" embedding
            emb = label if emb is None else emb + label
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


# ---------------------------------------------------------------------------------------
# The Diffusion Transformer (Peebles & Xie 2023)
# ---------------------------------------------------------------------------------------

def patchify(x, p):
    """Cut images into non-overlapping p x p patches, one token each (ViT, Dosovitskiy et al. 2021, sec. 3.1).

    (B, C, H, W) -> (B, N, p*p*C), N = (H/p) * (W/p). Patches are numbered row-major: token
    n = i * (W/p) + j is the patch of rows i*p .. i*p+p-1 and columns j*p .. j*p+p-1.
    Within a token the features are ordered (row in patch, column in patch, channel):
    tokens[b, n, (a * p + q) * C + c] = x[b, c, i*p + a, j*p + q].
    """
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not divisible by the patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)   # (B, C, i, a, j, q)
    x = x.permute(0, 2, 4, 3, 5, 1)             # (B, i, j, a, q, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p, channels, height, width):
    """The exact inverse of patchify: (B, N, p*p*C) -> (B, C, H, W), same orderings."""
    b, n, d = tokens.shape
    if height % p or width % p:
        raise ValueError(f"unpatchify: image size {height}x{width} is not divisible by the patch size {p}")
    gh, gw = height // p, width // p
    if n != gh * gw or d != p * p * channels:
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not tile a {channels}x{height}x{width} "
                         f"image with {p}x{p} patches (expected (B, {gh * gw}, {p * p * channels}))")
    x = tokens.reshape(b, gh, gw, p, p, channels)  # (B, i, j, a, q, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                # (B, C, i, a, j, q)
    return x.reshape(b, channels, height, width)


def sincos_position_embedding(grid_h, grid_w, dim):
    """Fixed 2-D sine-cosine position embedding (MAE, He et al. 2022; used by DiT, sec. 3.2 "Patchify").

    The position of token n = i * grid_w + j (row i, column j; patchify's order) is encoded
    as a 1-D sinusoidal embedding of i in the first half of the dims and of j in the second:

        w_k = 10000^(-k / (D/4)),  k = 0 .. D/4 - 1
        e[n, k]         = sin(i * w_k),   e[n, D/4 + k]   = cos(i * w_k)
        e[n, D/2 + k]   = sin(j * w_k),   e[n, 3D/4 + k]  = cos(j * w_k)

    (Vaswani et al. 2017, sec. 3.5, once per axis.) Fixed, not learned, so that it exists for
    any grid: a 32x32 input gets its own 16x16 table from the same formula.
    -> (grid_h * grid_w, dim), float32.
    """
    if dim % 4:
        raise ValueError(f"sincos_position_embedding: dim {dim} must be divisible by 4 (sin, cos per axis)")
    quarter = dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # w_k
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # i of each token
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)             # j of each token
    ai, aj = rows[:, None] * freqs, cols[:, None] * freqs                       # (N, D/4) each
    return torch.cat([ai.sin(), ai.cos(), aj.sin(), aj.cos()], dim=1).float()


def xavier_init(linear):
    """Xavier-uniform weights, zero bias (Glorot & Bengio 2010), the ViT / DiT initialisation.

    Var(w) = 2 / (fan_in + fan_out) balances keeping the scale of the activations (forward,
    fan_in) and of the gradients (backward, fan_out) through the stack. PyTorch's default for
    nn.Linear, Var = 1 / (3 fan_in), is three times smaller for a square layer."""
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


def modulate(h, shift, scale):
    """Adaptive layer norm's affine part (DiT sec. 3.2 "adaLN"): h * (1 + scale) + shift.

    The "1 +" makes a zero regression (scale = 0) the plain, unmodulated norm.
    h: (B, N, D), shift, scale: (B, 1, D), one per image, broadcast over the tokens."""
    return h * (1 + scale) + shift


class DiTBlock(nn.Module):
    """A Transformer block conditioned by adaLN-Zero (DiT sec. 3.2, fig. 3, the best of its ablation, fig. 5).

    From the conditioning vector c the block regresses six vectors of width D,
        (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c)),
    and uses them around pre-norm self-attention and an MLP (ViT, Dosovitskiy et al. 2021, eq. 2-3):
        x = x + gate1 * Attention(modulate(LN(x), shift1, scale1))
        x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))
    The regression is zero-initialised ("-Zero"): all gates start at 0, so each block starts
    as the identity and the whole network as its final layer; DiT finds this trains faster
    and better than cross-attention, in-context tokens, or adaLN with gates starting at one.
    The layer norms have no affine weights of their own: the modulation plays that role.
    x: (B, N, D), c: (B, D) -> (B, N, D).
    """

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        if width % heads:
            raise ValueError(f"DiTBlock: width {width} does not split into {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = xavier_init(nn.Linear(width, 3 * width))
        self.proj = xavier_init(nn.Linear(width, width))
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        # GELU with the tanh approximation, as in ViT / DiT's MLP.
        self.mlp = nn.Sequential(xavier_init(nn.Linear(width, hidden)), nn.GELU(approximate="tanh"),
                                 xavier_init(nn.Linear(hidden, width)))
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(width, 6 * width)))

    def attention(self, h):
        """Multi-head self-attention over the tokens, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, sec. 3.2)."""
        b, n, d = h.shape
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, D/heads)
        out = F.scaled_dot_product_attention(q, k, v)   # (B, heads, N, D/heads)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class DiTFinalLayer(nn.Module):
    """DiT's output head (sec. 3.2 "Transformer decoder"): adaLN, then a linear map from each
    token to its patch, p*p*out_channels numbers.

        out = Linear(modulate(LN(x), shift(c), scale(c)))

    Both the modulation and the linear map are zero-initialised, so the untrained network
    predicts exactly 0, the mean of the noise (or of v), as the U-Net's zero output conv does.
    x: (B, N, D), c: (B, D) -> (B, N, p*p*out_channels)."""

    def __init__(self, width, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(width, 2 * width)))
        self.linear = zero_init(nn.Linear(width, patch_size * patch_size * out_channels))

    def forward(self, x, c):
        shift, scale = self.modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023), called as net(x, t, y=None) like the U-Net.

    in_channels / out_channels: image channels (1 for MNIST).
    image_size: the side of the images the position table is built for (other sizes divisible
        by patch_size also work: their table is computed on the fly).
    patch_size: p; the image becomes (H/p) * (W/p) tokens (DiT's "/2", "/4", "/8").
    width, depth, heads, mlp_ratio: the Transformer (DiT-S is 384, 12, 6, 4; MNIST needs far less).
    num_classes: if set, net(x, t, y) with y in [0, num_classes]; y = num_classes (or None)
        is "no label", for classifier-free guidance.
    """

    def __init__(self, in_channels=1, out_channels=1, image_size=28, patch_size=2, width=128, depth=4,
                 heads=4, mlp_ratio=4, num_classes=None):
        super().__init__()
        if width % heads:
            raise ValueError(f"DiT: width {width} does not split into {heads} heads")
        if width % 4:
            raise ValueError(f"DiT: width {width} must be divisible by 4 (the 2-D sin-cos position embedding)")
        if image_size % patch_size:
            raise ValueError(f"DiT: image size {image_size} is not divisible by the patch size {patch_size}")
        self.patch_size, self.width, self.out_channels = patch_size, width, out_channels
        self.num_classes = num_classes
        self.null_label = num_classes  # the "no label" index (None: no class conditioning)

        # Patch embedding: one linear map per p x p patch, written as a stride-p convolution
        # (the same map as patchify followed by a Linear, with the weights in (C, p, p) order).
        # Initialised as that Linear would be (DiT does the same).
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Fixed positions: a buffer, not a parameter, and not saved (recomputable from the formula).
        self.grid = image_size // patch_size
        self.register_buffer("pos_embed", sincos_position_embedding(self.grid, self.grid, width), persistent=False)

        # Conditioning c: sinusoidal(t) -> Linear -> SiLU -> Linear (DiT's timestep embedder),
        # plus the label's vector. Small normal weights (std 0.02) as in DiT, so that neither
        # term swamps the other at the start.
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        if num_classes is not None:
            self.label_emb = LabelEmbedding(num_classes, width)
            nn.init.normal_(self.label_emb.weight, std=0.02)

        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final = DiTFinalLayer(width, patch_size, out_channels)

    def position_embedding(self, grid_h, grid_w):
        """The (N, width) table for a grid of grid_h x grid_w patches: the stored one, or a fresh one."""
        if grid_h == grid_w == self.grid:
            return self.pos_embed
        return sincos_position_embedding(grid_h, grid_w, self.width).to(self.pos_embed.device)

    def embed(self, x, t, y):
        """The conditioning vector c (B, width)."""
        if t is None:
            raise ValueError("the DiT is time-conditioned: call it as net(x, t) or net(x, t, y)")
        c = self.time_mlp(timestep_embedding(t, self.width))
        if self.num_classes is not None:
            c = c + self.label_emb.embed(y, x)  # y=None: the "no label" embedding
        elif y is not None:
            raise ValueError("this DiT has no class conditioning (num_classes=None): call it without labels")
        return c

    def forward(self, x, t=None, y=None):
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DiT: image size {h}x{w} is not divisible by the patch size {p}")
        c = self.embed(x, t, y)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, width, H/p, W/p) -> (B, N, width), row-major
        tokens = tokens + self.position_embedding(h // p, w // p).to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final(tokens, c)                               # (B, N, p*p*out_channels)
        return unpatchify(out, p, self.out_channels, h, w)
