"""--score-samples in each training script: checked before anything runs, announced, and scored
by score.py at the end (and with --eval-only)."""
import importlib
import json
import shutil

import pytest

TRAINING_SCRIPTS = {
    "ddpm.py": ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--timesteps", "10", "--no-attention",
                "--eval-images", "0", "--num-samples", "4", "--sampler", "ddim", "--sample-steps", "3"],
    "vae.py": ["--hidden-dim", "16", "--latent-dim", "3", "--iw-samples", "0", "--num-samples", "4"],
    "vae_no_encoder.py": ["--channels", "8"],
}


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_training_scripts_score_their_samples(script, classifier, fake_mnist, tmp_path, capsys):
    main = importlib.import_module(script[:-3]).main  # in this process: the parsing is the command line's
    out = tmp_path / "run"
    common = ["--data-dir", fake_mnist, "--out-dir", str(out), "--batch-size", "32", "--max-steps", "2",
              "--device", "cpu", *TRAINING_SCRIPTS[script]]
    # without a classifier: one line that says how to make one, before anything is trained or written
    with pytest.raises(SystemExit) as e:
        main([*common, "--score-samples", "260", "--classifier", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "score.py --train-classifier" in err and not out.exists()

    main([*common, "--score-samples", "260", "--classifier", classifier])
    stdout = capsys.readouterr().out
    assert "at the end: 260" in stdout  # announced before training
    lines = stdout.strip().splitlines()
    metrics = json.load(open(out / "metrics.json"))
    scored = metrics["score"].values() if script == "vae_no_encoder.py" else [metrics["score"]]
    for s in scored:  # 260 samples: more than one batch of 256
        assert s["n"] == 260 and s["n_real"] == 64 and s["fd"] >= 0 and 0 <= s["precision"] <= 1
        assert f"FD {s['fd']:.2f}" in lines[-1]
    assert "about" in stdout and "min to go" in stdout


def test_ddpm_eval_only_scores_a_checkpoint(checkpoints, classifier, fake_mnist, tmp_path):
    import ddpm
    shutil.copy(checkpoints["ddpm"], tmp_path / "ckpt.pt")
    ddpm.main(["--eval-only", "--out-dir", str(tmp_path), "--data-dir", fake_mnist, "--device", "cpu",
               "--eval-images", "0", "--num-samples", "4", "--sampler", "ddim", "--sample-steps", "3", "--eta", "1",
               "--score-samples", "20", "--classifier", classifier])
    s = json.load(open(tmp_path / "eval.json"))["score"]
    assert s["n"] == 20 and s["sampling"].startswith("DDIM, eta 1, 3 network calls")


def test_vne_sweep_does_not_score(fake_mnist, classifier, capsys):
    import vae_no_encoder
    with pytest.raises(SystemExit) as e:
        vae_no_encoder.main(["--sweep", "a", "--score-samples", "10", "--classifier", classifier])
    assert e.value.code == 2 and "--score-samples scores the run being trained" in capsys.readouterr().err
