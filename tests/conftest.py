"""Shared pytest fixtures.

`fake_mnist` writes a tiny synthetic MNIST (digit-like strokes, with labels) as IDX files
in torchvision's on-disk layout (<root>/MNIST/raw/...), so every script's real data loader
(`torchvision.datasets.MNIST(root, download=True)`) runs offline: torchvision finds the four
raw files and skips the download.
"""
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # make `import ddpm`, `import unet`, ... work from any cwd


def _write_idx_images(path, images):
    # IDX3: magic 0x00000803, count, rows, cols (big-endian uint32), then uint8 pixels.
    with open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28))
        f.write(images.astype(np.uint8).tobytes())


def _write_idx_labels(path, labels):
    # IDX1: magic 0x00000801, count, then uint8 labels.
    with open(path, "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)))
        f.write(labels.astype(np.uint8).tobytes())


def _stroke_digit(label, rng):
    """A 28x28 uint8 'digit': a class-specific set of thick strokes, randomly shifted."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    cy, cx = 14 + rng.uniform(-2, 2), 14 + rng.uniform(-2, 2)
    img = np.zeros((28, 28), np.float32)
    r = np.hypot(yy - cy, xx - cx)
    ang = np.arctan2(yy - cy, xx - cx)
    if label in (0, 6, 8, 9):  # rings
        img += np.exp(-((r - 7) ** 2) / 2.0)
    if label in (1, 4, 7):  # vertical bar
        img += np.exp(-((xx - cx) ** 2) / 2.0) * (np.abs(yy - cy) < 9)
    if label in (2, 3, 5, 7):  # horizontal bars
        img += np.exp(-((yy - cy + 7) ** 2) / 2.0) * (np.abs(xx - cx) < 7)
        img += np.exp(-((yy - cy - 7) ** 2) / 2.0) * (np.abs(xx - cx) < 7) * (label != 7)
    if label in (2, 4, 5, 8):  # diagonal
        d = (yy - cy) * math.cos(math.pi / 4 + label) - (xx - cx) * math.sin(math.pi / 4 + label)
        img += np.exp(-(d ** 2) / 2.0) * (r < 9)
    if label in (6, 9):  # a tail
        img += np.exp(-((ang - (1.5 if label == 6 else -1.5)) ** 2) / 0.05) * (r < 12)
    img = np.clip(img * 255 * rng.uniform(0.8, 1.0), 0, 255)
    return img.astype(np.uint8)


def make_fake_mnist(root, n_train=256, n_test=64, seed=0):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = np.stack([_stroke_digit(int(y), rng) for y in labels])
        _write_idx_images(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        _write_idx_labels(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    return root


def run_in_process(main, argv, capsys):
    """A script's main(argv) called in this process, as the command line would run it, without a new
    interpreter: (exit code, stdout, stderr). Bad input exits through SystemExit with its code."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def each_script_names_itself():
    """sample.py, bench.py and latent_diffusion.py name themselves in the error lines of the
    plumbing they borrow (its PROG); in this one process, every test starts from each script's
    own name."""
    for name in ("ddpm", "vae", "vae_no_encoder", "score", "discrete_diffusion"):
        if name in sys.modules:
            sys.modules[name].PROG = name + ".py"


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    """Path to a data dir holding the fake MNIST (256 train, 64 test images)."""
    return str(make_fake_mnist(str(tmp_path_factory.mktemp("fake_mnist"))))


@pytest.fixture(scope="session")
def run_script():
    """Run `python <script> <args...>` in a subprocess from the project root.

    Returns the CompletedProcess (text mode). Threads are limited so that a test run stays
    fast and quiet on small CI machines.
    """

    def run(script, *args, timeout=300):
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, script), *map(str, args)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )

    return run


# (--no-attention: at 14 x 14, the lowest level of a 2-level U-Net, attention is 4/5 of a tiny step on a CPU)
TINY_DDPM = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--timesteps", "10", "--no-attention",
             "--batch-size", "32", "--max-steps", "2", "--eval-images", "0", "--num-samples", "4", "--device", "cpu"]
TINY_VNE = ["--channels", "8", "--batch-size", "32", "--max-steps", "2", "--device", "cpu"]
TINY_VAE = ["--hidden-dim", "16", "--latent-dim", "3", "--batch-size", "32", "--max-steps", "2",
            "--iw-samples", "0", "--num-samples", "4", "--device", "cpu"]
TINY_LD = ["--width", "16", "--depth", "1", "--timesteps", "10", "--batch-size", "32", "--max-steps", "2",
           "--eval-images", "4", "--num-samples", "4", "--device", "cpu"]


@pytest.fixture(scope="session")
def checkpoints(fake_mnist, tmp_path_factory):
    """sample.py's inputs: a tiny trained checkpoint of each kind: {kind: path} (latent_diffusion
    on the vae's latents)."""
    import ddpm
    import latent_diffusion
    import vae
    import vae_no_encoder
    root = tmp_path_factory.mktemp("ckpts")
    ddpm.main(["--data-dir", fake_mnist, "--out-dir", str(root / "ddpm"), *TINY_DDPM])
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(root / "vae"), *TINY_VAE])
    vae_no_encoder.main(["--data-dir", fake_mnist, "--out-dir", str(root / "vne"), *TINY_VNE])
    latent_diffusion.main(["--vae-ckpt", str(root / "vae" / "ckpt.pt"), "--data-dir", fake_mnist,
                           "--out-dir", str(root / "ld"), *TINY_LD])
    return {kind: str(root / folder / "ckpt.pt") for kind, folder in
            (("ddpm", "ddpm"), ("vae", "vae"), ("vae_no_encoder", "vne"), ("latent_diffusion", "ld"))}


@pytest.fixture(scope="session")
def classifier(fake_mnist, tmp_path_factory):
    """A score.py classifier trained for a few steps on the fake MNIST: its checkpoint path."""
    import score
    path = str(tmp_path_factory.mktemp("clf") / "ckpt.pt")
    score.main(["--train-classifier", "--data-dir", fake_mnist, "--classifier", path, "--max-steps", "6",
                "--batch-size", "32", "--device", "cpu", "--log-every", "3"])
    return path
