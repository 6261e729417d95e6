"""sample.py on tiny checkpoints of each kind, trained on the fake MNIST in fixtures."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import run_in_process


def run(capsys, *argv):
    """sample.main in this process: (exit code, stdout, stderr)."""
    return run_in_process(sample.main, argv, capsys)


def grid_size(n, nrow, pad=2):
    """The pixel size torchvision's save_image gives n 28x28 images in rows of nrow."""
    rows = -(-n // nrow)
    return nrow * (28 + pad) + pad, rows * (28 + pad) + pad


@pytest.mark.parametrize("kind", ["ddpm", "vae", "vae_no_encoder", "latent_diffusion"])
def test_grid_and_array(kind, checkpoints, tmp_path, capsys):
    out, arr = tmp_path / "grid.png", tmp_path / "s.npz"
    code, stdout, err = run(capsys, "--ckpt", checkpoints[kind], "--n", 6, "--nrow", 3, "--out", out,
                            "--save-array", arr, "--batch-size", 4)
    assert code == 0, err
    assert "images/s" in stdout
    assert Image.open(out).size == grid_size(6, 3)
    samples = np.load(arr)["samples"]
    assert samples.shape == (6, 1, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1 and np.isfinite(samples).all()


@pytest.mark.parametrize("kind,extra", [("ddpm", ["--sampler", "ddim", "--sample-steps", 3]),
                                        ("ddpm", []), ("vae", []), ("vae_no_encoder", ["--prior", "standard"]),
                                        ("latent_diffusion", ["--sampler", "ddpm"])])
def test_same_seed_same_samples(kind, extra, checkpoints, tmp_path, capsys):
    arrays = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path / f"{name}.npz"
        code, _, err = run(capsys, "--ckpt", checkpoints[kind], "--n", 5, "--seed", seed, "--out",
                           tmp_path / f"{name}.png", "--save-array", path, *extra)
        assert code == 0, err
        arrays[name] = np.load(path)["samples"]
    assert np.array_equal(arrays["a"], arrays["b"])
    assert not np.array_equal(arrays["a"], arrays["c"])


def test_ddpm_trajectory_and_raw_weights(checkpoints, tmp_path, capsys):
    out = tmp_path / "g.png"
    code, stdout, err = run(capsys, "--ckpt", checkpoints["ddpm"], "--n", 4, "--out", out, "--sampler", "ddim",
                            "--sample-steps", 10, "--eta", 0.5, "--trajectory", "--raw-weights")
    assert code == 0, err
    assert Image.open(tmp_path / "g_trajectory.png").size == grid_size(80, 10)  # 8 samples x 10 steps


def test_vae_interpolation_and_reconstructions(checkpoints, fake_mnist, tmp_path, capsys):
    out = tmp_path / "g.png"
    code, stdout, err = run(capsys, "--ckpt", checkpoints["vae"], "--n", 4, "--out", out, "--interpolate")
    assert code == 0 and "random latents" in stdout, err
    assert Image.open(tmp_path / "g_interpolation.png").size == grid_size(80, 10)
    code, stdout, err = run(capsys, "--ckpt", checkpoints["vae"], "--n", 4, "--out", out, "--interpolate",
                            "--reconstruct", "--data-dir", fake_mnist)
    assert code == 0 and "test digits" in stdout, err
    assert os.path.exists(tmp_path / "g_reconstructions.png")


def test_command_line_in_a_subprocess(run_script, checkpoints, tmp_path):
    proc = run_script("sample.py", "--ckpt", checkpoints["ddpm"], "--n", "4", "--out", tmp_path / "g.png",
                      "--sampler", "ddim", "--sample-steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout and os.path.exists(tmp_path / "g.png")


def test_bad_checkpoints(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"kind": "gan", "config": {}}, foreign)
    newer, older = tmp_path / "newer.pt", tmp_path / "older.pt"
    torch.save({"kind": "ddpm", "version": 99, "config": {}}, newer)
    torch.save({"kind": "vae", "version": 1, "config": {"conditional": False}}, older)  # before class_cond
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    for path, words in ((tmp_path / "missing.pt", "no checkpoint"), (garbage, "not a readable checkpoint"),
                        (foreign, "unknown kind 'gan'"), (newer, "format 99; ddpm.py reads format 2"),
                        (older, "format 1; vae.py reads format 2: retrain"), (plain, "not a checkpoint of this project")):
        code, _, err = run(capsys, "--ckpt", path)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("kind", ["ddpm", "vae", "vae_no_encoder", "latent_diffusion"])
def test_errors_of_the_checkpoints_own_script_name_sample_py(kind, checkpoints, tmp_path, capsys):
    """The device is checked by the checkpoint's script's plumbing (its setup): the line still names
    the command the user ran."""
    missing = "mps" if torch.cuda.is_available() else "cuda"  # (no machine has both)
    code, _, err = run(capsys, "--ckpt", checkpoints[kind], "--device", missing, "--out", tmp_path / "g.png")
    assert code == 2 and err.strip() == f"sample.py: error: --device {missing} asked, but it is not available", err


def test_outputs_checked_before_sampling(checkpoints, tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    for argv, words in ((["--out", missing / "g.png"], "--out"),
                        (["--out", tmp_path / "g.png", "--save-array", missing / "s.npz"], "--save-array")):
        code, stdout, err = run(capsys, "--ckpt", checkpoints["ddpm"], "--n", 2, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"sample.py: error: {words}") and "does not exist" in err, err
        assert "drew" not in stdout and not missing.exists()
    code, _, err = run(capsys, "--ckpt", checkpoints["ddpm"], "--n", 2, "--out", tmp_path)
    assert code == 2 and "is a folder" in err, err
    assert not (tmp_path / "g.png").exists()


def test_read_only_out_folder(checkpoints, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: make the check see what a user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder) else access(p, mode))
    try:
        code, stdout, err = run(capsys, "--ckpt", checkpoints["vae"], "--out", folder / "g.png")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "not writable" in err, err
        assert "drew" not in stdout
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("kind,argv,words", [
    ("vae", ["--sample-steps", "10"], "--sample-steps applies to ddpm"),
    ("vae", ["--trajectory"], "--trajectory applies to ddpm"),
    ("ddpm", ["--interpolate"], "--interpolate applies to vae"),
    ("ddpm", ["--sampler", "ddpm", "--sample-steps", "5"], "apply to --sampler ddim"),
    ("ddpm", ["--sampler", "ddpm", "--eta", "1"], "apply to --sampler ddim"),
    ("ddpm", ["--sampler", "ddim", "--sample-steps", "50"], "more than the model's T"),
    ("vae", ["--reconstruct"], "needs --data-dir"),
    ("vae", ["--prior", "fitted"], "--prior applies to vae_no_encoder"),
    ("vae_no_encoder", ["--eta", "0.5"], "--eta applies to ddpm"),
    ("vae", ["--n", "0"], "--n"),
    ("vae", ["--save-array", "x.txt"], ".npz"),
    ("vae", ["--out", "grid"], "--out writes a picture"),
    ("ddpm", ["--out", "grid.npz"], "--out writes a picture"),
])
def test_flags_that_do_not_apply(kind, argv, words, checkpoints, capsys):
    code, _, err = run(capsys, "--ckpt", checkpoints[kind], *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
