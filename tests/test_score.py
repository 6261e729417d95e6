"""score.py: the scores against closed forms and toy cases, and the CLI end to end on fake MNIST."""
import json
import math
import os

import numpy as np
import pytest
import torch

import score


# --- Frechet distance --------------------------------------------------------------------

def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_sqrtm_of_a_squared_spd_matrix_is_that_matrix():
    r = random_spd(6, 0)
    assert torch.allclose(score.sqrtm_psd(r @ r), r, atol=1e-8)


def test_sqrtm_clamps_tiny_negative_eigenvalues():
    v = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    a = v @ torch.diag(torch.tensor([4.0, 1.0, 0.0, -1e-12], dtype=torch.float64)) @ v.T
    root = score.sqrtm_psd(a)
    assert torch.isfinite(root).all()
    assert torch.allclose(root @ root, v @ torch.diag(torch.tensor([4.0, 1.0, 0, 0], dtype=torch.float64)) @ v.T, atol=1e-9)


def test_fd_diagonal_closed_form():
    # W2^2 of diagonal Gaussians: |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.5, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = score.frechet_distance(t(mu1), torch.diag(t(a)), t(mu2), torch.diag(t(b)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_full_covariances_against_numpy_eig():
    # Independent route: tr((S1 S2)^1/2) = sum sqrt(eigenvalues of the non-symmetric S1 S2).
    s1, s2 = random_spd(5, 1), random_spd(5, 2)
    mu1, mu2 = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    eig = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    expected = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.sqrt(eig.real).sum()
    assert score.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_commuting_covariances():
    # Same eigenvectors: the distance is the diagonal one in that basis.
    v = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    a, b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 0.5, 3.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    got = score.frechet_distance(z, v @ torch.diag(a) @ v.T, z, v @ torch.diag(b) @ v.T)
    assert got == pytest.approx(((a.sqrt() - b.sqrt()) ** 2).sum().item(), rel=1e-9)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(60, 8, generator=g) * 1.5 + 0.3
    sx, sy = score.gaussian_stats(x), score.gaussian_stats(y)
    assert abs(score.frechet_distance(*sx, *sx)) < 1e-8  # N < D would be singular: clamped, still ~0
    assert score.frechet_distance(*sx, *sy) == pytest.approx(score.frechet_distance(*sy, *sx), rel=1e-8)
    few = score.gaussian_stats(torch.randn(5, 8, generator=g))  # singular: rank 4 of 8
    # sqrt of round-off-sized eigenvalues (~1e-16) is ~1e-8 each: ~0 means to about 1e-7 here
    assert abs(score.frechet_distance(*few, *few)) < 1e-6


def test_gaussian_stats_is_the_unbiased_covariance():
    x = torch.randn(40, 3, dtype=torch.float64)
    mu, cov = score.gaussian_stats(x)
    assert torch.allclose(mu, x.mean(0)) and torch.allclose(cov, torch.from_numpy(np.cov(x.numpy().T)))


# --- precision / recall, IS ----------------------------------------------------------------

def test_precision_recall_identical_and_disjoint():
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    assert score.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert score.precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_known_fraction():
    # Real: 0..9 on a line, k = 1 radius 1 each. Fake: 0..4 and 100..104 (radius 1 each).
    line = lambda v: torch.tensor([[float(t), 0.0] for t in v])  # noqa: E731
    real, fake = line(range(10)), line(list(range(5)) + list(range(100, 105)))
    precision, recall = score.precision_recall(real, fake, k=1)
    assert precision == pytest.approx(0.5)  # 0..4 inside, 100..104 not
    assert recall == pytest.approx(0.6)     # reals 0..5 are within 1 of a fake point


def test_knn_radius_excludes_the_point_itself():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert score.knn_radii(pts, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert score.knn_radii(pts, 2, chunk=3).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_inception_score_limits():
    onehot = torch.eye(10).repeat(7, 1)  # confident, all classes equally often
    assert score.inception_score(onehot) == pytest.approx(10.0, rel=1e-9)
    same = torch.softmax(torch.randn(1, 10), 1).repeat(30, 1)
    assert score.inception_score(same) == pytest.approx(1.0, abs=1e-9)
    # two classes, confident: 2; the formula exp(H(p(y)) - E H(p(y|x)))
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    py = p.mean(0)
    h = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    assert score.inception_score(p) == pytest.approx(math.exp(h(py) - h(p).mean()), rel=1e-6)


def test_class_histogram_and_entropy():
    feats = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    one_class = torch.zeros(40, 10)
    one_class[:, 8] = 1
    s = score.scores(feats, one_class, feats, k=3)
    assert s["class_histogram"] == [0] * 8 + [40, 0] and math.copysign(1, s["class_entropy_nats"]) == 1  # 0, not -0
    assert s["class_entropy_nats"] == 0 and s["mean_max_confidence"] == 1 and s["fd"] == pytest.approx(0, abs=1e-6)
    balanced = torch.eye(10).repeat(4, 1)
    assert score.scores(feats, balanced, feats, k=3)["class_entropy_nats"] == pytest.approx(math.log(10))


def test_augment_with_no_shift_or_rotation_is_identity():
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(score.augment(x, 0.0, 0.0), x, atol=1e-5)
    shifted = score.augment(x, 2.0, 10.0)
    assert shifted.shape == x.shape and 0 <= shifted.min() and shifted.max() <= 1 + 1e-6


# --- the CLI on fake MNIST -----------------------------------------------------------------

def one_line_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as e:
        score.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


def fake_samples(fake_mnist, n=40):
    import torchvision
    ds = torchvision.datasets.MNIST(fake_mnist, train=True, download=False)
    return (ds.data[:n].numpy()[:, None] / 255.0).astype(np.float32), ds.targets[:n].numpy()


def test_train_classifier_writes_a_checkpoint(classifier, capsys):
    ckpt = torch.load(classifier, weights_only=True)
    assert ckpt["kind"] == "classifier" and ckpt["step"] == 6 and ckpt["version"] == score.CKPT_VERSION
    assert {"config", "model", "optimizer", "epoch", "rng"} <= set(ckpt)
    metrics = json.load(open(os.path.join(os.path.dirname(classifier), "metrics.json")))
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["parameters"] == sum(v.numel() for v in score.Classifier().parameters())
    assert {"config", "step", "epochs_done", "train_loss", "train_images_per_sec", "wall_time_s", "train_seconds",
            "device", "peak_memory_mb"} <= set(metrics)
    one_line_error(capsys, ["--train-classifier", "--data-dir", "x", "--classifier", classifier], "exists")


def test_score_end_to_end_with_labels(classifier, fake_mnist, tmp_path, capsys):
    x, y = fake_samples(fake_mnist)
    np.savez(tmp_path / "s.npz", samples=x, labels=y)
    score.main([str(tmp_path / "s.npz"), "--classifier", classifier, "--data-dir", fake_mnist,
                "--json", str(tmp_path / "out" / "s.json"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "FD" in out and "compare FDs only at equal N" in out
    r = json.load(open(tmp_path / "out" / "s.json"))
    assert r["n"] == 40 and r["n_real"] == 40 and sum(r["class_histogram"]) == 40
    assert r["fd"] >= 0 and 1 <= r["is"] <= 10 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["class_entropy_nats"] <= math.log(10) + 1e-9


def test_score_cli_without_labels(classifier, fake_mnist, tmp_path, run_script):
    x, _ = fake_samples(fake_mnist, n=100)  # more than the 64 test digits: the reference is capped
    np.savez_compressed(tmp_path / "s.npz", samples=x)
    p = run_script("score.py", tmp_path / "s.npz", "--classifier", classifier, "--data-dir", fake_mnist,
                   "--json", tmp_path / "s.json", "--n-real", 1000, "--device", "cpu")
    assert p.returncode == 0, p.stderr
    r = json.load(open(tmp_path / "s.json"))
    assert r["n"] == 100 and r["n_real"] == 64 and "accuracy" not in r


def test_reference_table(classifier, fake_mnist, tmp_path, capsys):
    score.main(["--reference", "--classifier", classifier, "--data-dir", fake_mnist, "--json",
                str(tmp_path / "ref.json"), "--device", "cpu"])
    rows = json.load(open(tmp_path / "ref.json"))["rows"]
    names = [r["name"] for r in rows]
    assert any("blurred" in n for n in names) and any("binarized" in n for n in names)
    assert sum("noise" in n for n in names) == 3 and rows[0]["n"] == 64


def test_bad_inputs_are_one_line(classifier, fake_mnist, tmp_path, capsys):
    common = ["--classifier", classifier, "--data-dir", fake_mnist, "--device", "cpu"]
    one_line_error(capsys, [str(tmp_path / "nope.npz"), *common], "no such file")
    np.savez(tmp_path / "shape.npz", samples=np.zeros((8, 28, 28), np.float32))
    one_line_error(capsys, [str(tmp_path / "shape.npz"), *common], "(N, 1, 28, 28)")
    nan = np.zeros((8, 1, 28, 28), np.float32)
    nan[3, 0, 5, 5] = np.nan
    np.savez(tmp_path / "nan.npz", samples=nan)
    one_line_error(capsys, [str(tmp_path / "nan.npz"), *common], "NaN")
    np.savez(tmp_path / "range.npz", samples=np.full((8, 1, 28, 28), -1, np.float32))
    one_line_error(capsys, [str(tmp_path / "range.npz"), *common], "[0, 1]")
    np.savez(tmp_path / "labels.npz", samples=np.zeros((8, 1, 28, 28), np.float32), labels=np.arange(3))
    one_line_error(capsys, [str(tmp_path / "labels.npz"), *common], "labels")
    good = tmp_path / "good.npz"
    np.savez(good, samples=np.zeros((8, 1, 28, 28), np.float32))
    one_line_error(capsys, [str(good), "--classifier", str(tmp_path / "none.pt")], "score.py --train-classifier")
    torch.save({"kind": "ddpm"}, tmp_path / "ddpm.pt")
    one_line_error(capsys, [str(good), "--classifier", str(tmp_path / "ddpm.pt")], "not a classifier checkpoint")
    one_line_error(capsys, [], "give one of")
    one_line_error(capsys, [str(good), "--reference"], "give one of")


# --- what the other scripts hand to score.py ---------------------------------------------

def test_score_an_npz_written_by_sample_py(checkpoints, classifier, fake_mnist, tmp_path, capsys):
    import sample
    arr = tmp_path / "ddpm.npz"
    sample.main(["--ckpt", checkpoints["ddpm"], "--n", "24", "--save-array", str(arr), "--out", str(tmp_path / "g.png")])
    score.main([str(arr), "--classifier", classifier, "--data-dir", fake_mnist, "--json", str(tmp_path / "s.json"),
                "--device", "cpu"])
    r = json.load(open(tmp_path / "s.json"))
    assert r["n"] == 24 and r["n_real"] == 24 and r["samples"] == str(arr) and r["fd"] >= 0
    assert "accuracy" not in r


def test_png_grid_gives_back_the_images_save_image_drew(tmp_path):
    from torchvision.utils import save_image
    x = torch.rand(13, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x[5] = 0  # an all-black sample inside the grid is kept; only empty cells at the end are dropped
    save_image(x, tmp_path / "g.png", nrow=4)  # 4 rows of 4: three empty cells
    got = score.load_grid(str(tmp_path / "g.png"))
    # save_image stores round(255 x) in 8 bits
    assert got.shape == (13, 1, 28, 28)
    assert torch.equal(got, torch.round(x * 255) / 255)


def test_score_a_png_grid_end_to_end(classifier, fake_mnist, tmp_path, capsys):
    from torchvision.utils import save_image
    x, _ = fake_samples(fake_mnist, n=20)
    save_image(torch.from_numpy(x), tmp_path / "grid.png", nrow=6)
    score.main([str(tmp_path / "grid.png"), "--classifier", classifier, "--data-dir", fake_mnist,
                "--json", str(tmp_path / "s.json"), "--device", "cpu"])
    assert json.load(open(tmp_path / "s.json"))["n"] == 20
    save_image(torch.from_numpy(x[:4]), tmp_path / "odd.png", nrow=4, padding=3)
    one_line_error(capsys, [str(tmp_path / "odd.png"), "--classifier", classifier], "not a grid of 28 x 28 digits")
    (tmp_path / "text.png").write_text("not an image")
    one_line_error(capsys, [str(tmp_path / "text.png"), "--classifier", classifier], "not a readable PNG")


# --- the training scripts' --score-samples: check_classifier and draw_and_score -----------

def test_check_classifier(classifier, fake_mnist, tmp_path, capsys):
    score.check_classifier(classifier, fake_mnist)  # there: nothing said
    assert capsys.readouterr() == ("", "")
    with pytest.raises(SystemExit) as e:
        score.check_classifier(str(tmp_path / "none.pt"), fake_mnist)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"score.py --train-classifier --data-dir {fake_mnist}" in err and str(tmp_path / "none.pt") in err


def test_scores_of_real_test_digits_drawn_as_samples(classifier, fake_mnist, capsys):
    # The sampler hands back the test split itself: the samples are the real set, so FD is ~0
    # (the floor) and every sample lies on the real manifold and vice versa.
    import torchvision
    ds = torchvision.datasets.MNIST(fake_mnist, train=False, download=False)
    test_x = ds.data[:, None].float() / 255
    given = iter(test_x.split(256))
    s = score.draw_and_score(lambda n, g: next(given), len(test_x), torch.device("cpu"), "the test split",
                             classifier, fake_mnist, seed=0)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"score: drawing 64 samples (the test split), then scoring them with {classifier}"
    assert s["n"] == s["n_real"] == 64 and s["fd"] == pytest.approx(0, abs=1e-6)
    assert s["precision"] == s["recall"] == 1 and s["sampling"] == "the test split" and s["sample_seconds"] >= 0
    assert "accuracy" not in s and f"FD {s['fd']:.2f}" in out[-1]


def test_draw_and_score_batches_seeds_and_labels(classifier, fake_mnist, capsys):
    # 300 samples: batches of 256 and 44 from one generator seeded seed + SEED_SCORE; with labels
    # each batch gets its slice. The label the classifier gives each image: accuracy 1; any other: 0.
    seen, seed = [], 5

    def draw(n, g, y):
        x = torch.rand(n, 1, 28, 28, generator=g)
        seen.append((x, y))
        return x
    labels = torch.arange(300) % 10
    s = score.draw_and_score(draw, 300, torch.device("cpu"), "uniform noise", classifier, fake_mnist, seed, labels)
    out = capsys.readouterr().out
    assert [len(x) for x, _ in seen] == [256, 44] and torch.equal(torch.cat([y for _, y in seen]), labels)
    expected = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(seed + score.SEED_SCORE))
    x = torch.cat([x for x, _ in seen])
    assert torch.equal(x, expected)
    assert "about" in out and "min to go" in out and s["n"] == 300 and s["n_real"] == 64 and 0 <= s["accuracy"] <= 1
    with torch.no_grad():
        predicted = score.load_classifier(classifier, torch.device("cpu"), fake_mnist)(x).argmax(1)
    assert score.draw_and_score(lambda n, g, y: x[:n], 300, torch.device("cpu"), "", classifier, fake_mnist, seed,
                                predicted)["accuracy"] == 1
    assert score.draw_and_score(lambda n, g, y: x[:n], 300, torch.device("cpu"), "", classifier, fake_mnist, seed,
                                (predicted + 1) % 10)["accuracy"] == 0


def test_draw_and_score_reports_diverged_samples(classifier, fake_mnist, capsys):
    def draw(n, g):
        x = torch.rand(n, 1, 28, 28, generator=g)
        x[0, 0, 3, 3] = math.nan
        return x
    s = score.draw_and_score(draw, 10, torch.device("cpu"), "a diverged model", classifier, fake_mnist, seed=0)
    assert s == {"n": 10, "error": "the samples have 1 NaN or infinite values"}
    assert "score: not scored: the samples have 1 NaN" in capsys.readouterr().out
