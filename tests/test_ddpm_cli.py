"""ddpm.py end to end (in a subprocess and in this process), on the fake MNIST: files
written, exact resume, the compile + bf16 path, and one clear line for each kind of bad input."""
import functools
import json
import math
import os

import pytest
import torch

TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--timesteps", "10", "--no-attention",
        "--batch-size", "32", "--log-every", "2", "--num-samples", "4", "--device", "cpu"]
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # downloads fail at once


def ddpm(run_script, data, out, *args):
    return run_script("ddpm.py", "--data-dir", data, "--out-dir", out, *TINY, *args)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and all(n in lines[0] for n in needles), lines[0]


class InProcess:
    """ddpm.main() called in this process: the same parsing and checks as the command line,
    without a new interpreter for each of the many bad inputs below."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def ddpm_main(capsys, data, out, *args):
    import ddpm as script
    argv = ["--data-dir", str(data), "--out-dir", str(out), *TINY, *map(str, args)]
    try:
        script.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return InProcess(code, captured.out, captured.err)


def test_train_writes_checkpoint_grids_metrics(run_script, fake_mnist, tmp_path):
    out = str(tmp_path / "run")
    proc = ddpm(run_script, fake_mnist, out, "--epochs", "2", "--sample-every", "1", "--eval-images", "2")
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "by t quarter" in proc.stdout and "bits/dim" in proc.stdout
    assert "first training step" not in proc.stdout  # nothing compiled (the default)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.json", "samples_epoch_001.png", "samples_epoch_002.png"]
    ckpt = load(os.path.join(out, "ckpt.pt"))  # plain data: loads with weights_only=True
    assert ckpt["kind"] == "ddpm" and ckpt["step"] == 16 and ckpt["epoch"] == 2  # 256 images / 32 = 8 steps/epoch
    assert set(ckpt["model"]) == set(ckpt["ema"]) and not any("_orig_mod" in k for k in ckpt["model"])
    assert ckpt["config"]["timesteps"] == 10 and "cpu" in ckpt["rng"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("train_loss", "test_loss", "test_bpd", "train_images_per_sec", "wall_time_s", "peak_memory_mb", "device"):
        assert metrics[key] is not None, key
    assert metrics["test_bpd"] > 0 and metrics["config"]["epochs"] == 2


def test_resume_continues_exactly(capsys, fake_mnist, tmp_path):
    # In this process (ddpm.main) to save interpreter starts; the subprocess tests above and
    # below cover the command line itself.
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--eval-images", "0", "--sample-every", "5")
    assert ddpm_main(capsys, fake_mnist, straight, "--max-steps", "11", *common).returncode == 0
    assert ddpm_main(capsys, fake_mnist, split, "--max-steps", "5", *common).returncode == 0  # stops mid-epoch
    assert load(split / "ckpt.pt")["step"] == 5
    proc = ddpm_main(capsys, fake_mnist, split, "--max-steps", "11", "--resume", *common)
    assert proc.returncode == 0, proc.stderr
    assert "resumed" in proc.stdout and "at step 5" in proc.stdout
    a, b = load(straight / "ckpt.pt"), load(split / "ckpt.pt")
    assert a["step"] == b["step"] == 11
    for key in a["model"]:  # same batches, same noise, same optimizer state: the same weights
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_minutes_is_a_training_time_budget_kept_over_resumes(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    common = ("--epochs", "1000", "--eval-images", "0", "--sample-every", "1000")
    proc = ddpm_main(capsys, fake_mnist, out, "--minutes", "0.004", *common)  # 0.24 s: a few steps of 8000
    assert proc.returncode == 0, proc.stderr
    first = load(out / "ckpt.pt")
    assert 0 < first["step"] < 8000 and first["train_seconds"] >= 0.24
    assert os.path.exists(out / f"samples_step_{first['step']:06d}.png")  # stopped mid-epoch: named by its step
    proc = ddpm_main(capsys, fake_mnist, out, "--resume", "--minutes", "0.01", *common)  # 0.6 s in all
    assert proc.returncode == 0, proc.stderr
    second, metrics = load(out / "ckpt.pt"), json.load(open(out / "metrics.json"))
    assert second["step"] > first["step"] and 0.6 <= second["train_seconds"] <= metrics["train_seconds"]


def test_training_clock_leaves_out_pauses(monkeypatch):
    import ddpm as script
    now = [100.0]
    monkeypatch.setattr(script.time, "perf_counter", lambda: now[0])
    meter = script.Meter(0, 10, 5, 2, 5, torch.device("cpu"))
    now[0] += 3.0  # training
    with meter.paused():  # a grid: not training time, also while it is drawn
        now[0] += 50.0
        assert meter.training_seconds() == 3.0
    now[0] += 2.0
    assert meter.training_seconds() == 5.0


def test_eval_only(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    assert ddpm_main(capsys, fake_mnist, out, "--max-steps", "2", "--eval-images", "0").returncode == 0
    proc = ddpm_main(capsys, fake_mnist, out, "--eval-only", "--eval-images", "3", "--sampler", "ddim", "--sample-steps", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(out / "eval.json"))
    assert result["test_bpd_images"] == 3 and result["test_bpd"] > 0
    assert os.path.exists(out / "eval_samples_ddim.png")


def test_compile_and_bf16_path_on_cpu(capsys, fake_mnist, tmp_path, monkeypatch):
    """What runs on a GPU with --compile (torch.compile + bf16 autocast), exercised on the CPU so
    that code that breaks compile or autocast fails here and not on a user's GPU. After two
    steps any recompilation is an error: the learning rate and the EMA decay change every step
    (warm-up) as device tensors, never as constants baked into the compiled code. The backend is
    aot_eager: dynamo's tracing and AOT autograd, where graph breaks and recompiles happen,
    without inductor's C++ code generation (its CPU kernels are not the GPU's, and a cold build
    of them took 80 s here)."""
    import ddpm as script
    out, decay = tmp_path / "run", script.ema_decay
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    def strict_after_two_steps(k, max_decay):
        if k == 2:
            torch.compiler.set_stance("fail_on_recompile")
        return decay(k, max_decay)
    monkeypatch.setattr(script, "ema_decay", strict_after_two_steps)
    try:  # the samplers run eagerly: only the training network is compiled
        proc = ddpm_main(capsys, fake_mnist, out, "--max-steps", "5", "--compile", "--amp", "--eval-images", "0",
                         "--num-samples", "4", "--sampler", "ddim", "--sample-steps", "2", "--warmup-steps", "4")
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()  # in this process: the next tests start with no compiled code
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile=True, amp=True" in proc.stdout
    assert proc.stdout.count("first training step (torch.compile included): ") == 1  # the compile time, once
    metrics = json.load(open(out / "metrics.json"))
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["test_loss"])


@pytest.mark.parametrize("args,needle", [
    (["--schedule", "sigmoid"], "--schedule"),
    (["--minutes", "0"], "--minutes"),
    (["--arch", "transformer"], "--arch"),
    (["--timesteps", "0"], "--timesteps"),
    (["--timesteps", "-3"], "--timesteps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--pred", "score"], "--pred"),
    (["--channel-mult", "1,x"], "--channel-mult"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--sampler", "ddpm", "--sample-steps", "5"], "--sampler ddim"),
    (["--sampler", "ddpm", "--eta", "1"], "--sampler ddim"),
    (["--sampler", "ddim", "--sample-steps", "50"], "more than --timesteps"),
    (["--batch-size", "1000"], "larger than the training set"),
    (["--cuda-graph"], "--cuda-graph records the step on one CUDA device"),  # the tests run on the CPU
])
def test_bad_arguments(capsys, fake_mnist, tmp_path, args, needle):
    assert_one_line_error(ddpm_main(capsys, fake_mnist, tmp_path / "run", *args), needle)
    assert not os.path.exists(tmp_path / "run")


def test_missing_data_offline(capsys, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    proc = ddpm_main(capsys, tmp_path / "nowhere", tmp_path / "run")
    assert_one_line_error(proc, "MNIST", "train-images-idx3-ubyte", os.path.join("nowhere", "MNIST", "raw"))
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "run").exists()  # nothing left behind


def test_bad_checkpoints_never_overwrite(capsys, fake_mnist, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "ckpt.pt"

    ckpt.write_bytes(b"this is not a checkpoint")
    assert_one_line_error(ddpm_main(capsys, fake_mnist, out, "--resume"), "not a readable checkpoint")
    assert ckpt.read_bytes() == b"this is not a checkpoint"

    torch.save({"kind": "vae", "version": 1}, ckpt)
    before = ckpt.read_bytes()
    assert_one_line_error(ddpm_main(capsys, fake_mnist, out, "--resume"), "not a ddpm checkpoint")
    assert ckpt.read_bytes() == before

    for version in (1, 99):  # 1: before one vocabulary (class_cond in every script); 99: from the future
        torch.save({"kind": "ddpm", "version": version}, ckpt)
        assert_one_line_error(ddpm_main(capsys, fake_mnist, out, "--resume"), f"format {version}", "retrain")
    before = ckpt.read_bytes()
    # A new run into a folder that holds a checkpoint refuses rather than overwrite it.
    assert_one_line_error(ddpm_main(capsys, fake_mnist, out), "exists", "--resume")
    assert ckpt.read_bytes() == before

    assert_one_line_error(ddpm_main(capsys, fake_mnist, tmp_path / "empty", "--resume"), "no checkpoint")


def test_help_documents_every_flag(capsys, tmp_path):
    proc = ddpm_main(capsys, tmp_path, tmp_path / "run", "--help")
    assert proc.returncode == 0
    for flag in ("--data-dir", "--out-dir", "--epochs", "--max-steps", "--minutes", "--device", "--compile", "--cuda-graph", "--amp",
                 "--sample-every", "--resume", "--arch", "--schedule", "--timesteps", "--pred", "--ema-decay",
                 "--sampler", "--sample-steps", "--eta", "--eval-images"):
        assert flag in proc.stdout, flag


def test_unwritable_out_dir_is_one_line(capsys, fake_mnist, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(ddpm_main(capsys, fake_mnist, blocker / "run", "--max-steps", "1"), "--out-dir")


def test_meter_logs_means_since_the_last_line(capsys):
    import ddpm as script
    meter = script.Meter(0, 4, 2, 2, 2, torch.device("cpu"))
    values = [torch.tensor([1.0, 3.0]), torch.tensor([5.0, 7.0]), torch.tensor([10.0, 20.0]), torch.tensor([30.0, 40.0])]
    groups = [torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([0, 0])]
    lines = []
    for step, (v, g) in enumerate(zip(values, groups), start=1):
        meter.add("loss", v)
        meter.add("by half", v, group=g, groups=2)
        meter.tick(step)
        if meter.last and step % 2 == 0:
            lines.append(dict(meter.last))
    assert lines[0] == {"loss": 4.0, "by half": [1.0, 5.0]}       # (1+3+5+7)/4; group 0: 1, group 1: (3+5+7)/3
    assert lines[1] == {"loss": 25.0, "by half": [25.0, 0.0]}     # the sums restart after each line
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "step 2/4" in out[0] and "loss 4.0000" in out[0] and "by half 25.00 0.0000" in out[1]
