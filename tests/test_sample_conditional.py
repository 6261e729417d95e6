"""Conditional sampling and inpainting: ddpm.inpaint against exact answers, and sample.py's
--class / --per-class / --guidance / --guidance-sweep / --inpaint on tiny checkpoints."""
import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import sample
import vae

from conftest import TINY_DDPM, TINY_VAE, run_in_process


def point_mass_eps(sched, x_star):
    """The exact noise predictor when the data are one image x*: x_t = sqrt(ab) x* + sqrt(1 - ab) eps."""
    def model_fn(x_t, t):
        ab = ddpm.at(sched["alpha_bar"], t, x_t)
        return (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()
    return model_fn


@pytest.mark.parametrize("resample", [1, 3])
def test_inpaint_with_the_exact_model_of_one_image_gives_that_image(resample):
    sched = ddpm.make_schedule("linear", 50)
    x_star = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    known = torch.zeros_like(x_star)
    known[:, :, :14] = 1  # the top half known, the bottom half to fill
    calls = []
    fn = point_mass_eps(sched, x_star)
    out = ddpm.inpaint(lambda x, t: calls.append(1) or fn(x, t), sched, x_star, known, "eps", resample,
                       torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x_star, atol=1e-4, rtol=0)
    assert len(calls) == 50 * resample


def test_inpaint_keeps_the_known_pixels_exactly():
    sched = ddpm.make_schedule("linear", 20)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 28, 28, generator=g) * 2 - 1
    known = (torch.rand(3, 1, 28, 28, generator=g) > 0.5).float()
    junk = lambda x, t: torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t[0])))  # noqa: E731
    out = ddpm.inpaint(junk, sched, x0, known, "eps", 2, g)
    assert torch.equal(out[known == 1], x0[known == 1])  # the last step adds no noise to them
    assert not torch.allclose(out[known == 0], x0[known == 0])
    full = ddpm.inpaint(junk, sched, x0, torch.ones_like(x0), "eps", 1, g)
    assert torch.equal(full, x0)  # a fully known image comes back unchanged


@pytest.fixture(scope="module")
def conditional_checkpoints(fake_mnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    ddpm.main(["--data-dir", fake_mnist, "--out-dir", str(root / "ddpm"), *TINY_DDPM, "--class-cond"])
    vae.main(["--data-dir", fake_mnist, "--out-dir", str(root / "vae"), *TINY_VAE, "--class-cond"])
    return {"ddpm": str(root / "ddpm" / "ckpt.pt"), "vae": str(root / "vae" / "ckpt.pt")}


def run(capsys, *argv):
    return run_in_process(sample.main, argv, capsys)


@pytest.mark.parametrize("kind", ["ddpm", "vae"])
def test_per_class_grid_and_labels_in_the_array(kind, conditional_checkpoints, tmp_path, capsys):
    code, _, err = run(capsys, "--ckpt", conditional_checkpoints[kind], "--per-class", 2, "--out", tmp_path / "g.png",
                       "--save-array", tmp_path / "s.npz")
    assert code == 0, err
    assert Image.open(tmp_path / "g.png").size == (2 * 30 + 2, 10 * 30 + 2)  # a row per digit
    data = np.load(tmp_path / "s.npz")
    assert data["samples"].shape == (20, 1, 28, 28) and data["labels"].tolist() == [c for c in range(10) for _ in "ab"]
    code, _, err = run(capsys, "--ckpt", conditional_checkpoints[kind], "--class", "3,7", "--n", 5,
                       "--save-array", tmp_path / "t.npz", "--out", tmp_path / "t.png")
    assert code == 0, err
    assert np.load(tmp_path / "t.npz")["labels"].tolist() == [3, 7, 3, 7, 3]


def test_guidance_sweep_and_inpainting(conditional_checkpoints, checkpoints, fake_mnist, tmp_path, capsys):
    code, out, err = run(capsys, "--ckpt", conditional_checkpoints["ddpm"], "--per-class", 1, "--guidance-sweep", "0,2",
                         "--out", tmp_path / "sweep.png")
    assert code == 0, err
    assert Image.open(tmp_path / "sweep.png").size == (30 + 2, 21 * 30 + 2)  # 10 rows, a blank one, 10 rows
    for ckpt, extra in ((checkpoints["ddpm"], []), (conditional_checkpoints["ddpm"], ["--class", 8])):
        code, out, err = run(capsys, "--ckpt", ckpt, "--inpaint", "bottom", "--data-dir", fake_mnist, "--n", 3,
                             "--completions", 2, "--resample", 2, "--out", tmp_path / "inpaint.png", *extra)
        assert code == 0, err
        assert Image.open(tmp_path / "inpaint.png").size == (4 * 30 + 2, 3 * 30 + 2)  # masked, 2 fills, original


@pytest.mark.parametrize("which,argv,words", [
    ("plain_ddpm", ["--class", "3"], "unconditional"),
    ("plain_ddpm", ["--guidance", "1"], "unconditional"),
    ("cond_ddpm", ["--class", "12"], "0..9"),
    ("cond_ddpm", ["--class", "three"], "0..9"),
    ("cond_ddpm", ["--per-class", "2", "--n", "4"], "not both"),
    ("cond_ddpm", ["--guidance-sweep", "0,x"], "--guidance-sweep"),
    ("cond_vae", ["--guidance", "1"], "applies to ddpm"),
    ("plain_ddpm", ["--inpaint", "top"], "--data-dir"),
    ("plain_ddpm", ["--resample", "3"], "--inpaint"),
    ("plain_vae", ["--inpaint", "top"], "applies to ddpm"),
])
def test_bad_conditional_flags_are_one_line(which, argv, words, conditional_checkpoints, checkpoints, capsys):
    path = {"plain_ddpm": checkpoints["ddpm"], "plain_vae": checkpoints["vae"],
            "cond_ddpm": conditional_checkpoints["ddpm"], "cond_vae": conditional_checkpoints["vae"]}[which]
    code, _, err = run(capsys, "--ckpt", path, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
