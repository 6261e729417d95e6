"""torchrun DDP for ddpm.py on the CPU (gloo backend, 2 processes, the fake MNIST): the ranks
stay in lockstep, split each global batch, draw their own noise, and only rank 0 writes;
the checkpoint loads in sample.py and a resumed DDP run continues the step count; a tiny DiT
(--arch dit) trains the same way. (The runs share one torchrun start, which costs more than the
runs: tests/ddp_worker.py.)"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from ddp_worker import RUN_MARK

RUN = ["--timesteps", "10", "--batch-size", "32", "--log-every", "4", "--num-samples", "4", "--eval-images", "0",
       "--device", "cpu"]
TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--no-attention", *RUN]
TINY_DIT = ["--arch", "dit", "--patch-size", "7", "--width", "16", "--depth", "1", "--heads", "2", *RUN]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(probe_dir, *runs, nproc=2):
    """Each of runs (a list of ddpm.py flags) in turn, in the same nproc processes: for each run
    (its part of the log, each rank's probe record)."""
    os.makedirs(probe_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **{f"DDP_TEST_PORT_{i}": str(free_port()) for i in range(1, len(runs))})
    flags = [str(a) for i, run in enumerate(runs) for a in (["--then"] if i else []) + run]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "ddp_worker.py"), str(probe_dir), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(l for l in proc.stderr.splitlines() if "error" in l)[-3000:]
    logs = proc.stdout.split(RUN_MARK)
    assert len(logs) == len(runs)
    return [(logs[i], [torch.load(os.path.join(probe_dir, f"run{i}_rank{r}.pt"), weights_only=True)
                       for r in range(nproc)]) for i in range(len(runs))]


@pytest.fixture(scope="module")
def ddp_runs(fake_mnist, tmp_path_factory):
    """One epoch (256 digits, global batch 32: 8 steps) on 2 ranks, then --resume for a second;
    then, in the same processes, one epoch of a tiny DiT (--arch dit)."""
    out = tmp_path_factory.mktemp("ddp")
    run = ["--data-dir", fake_mnist, "--out-dir", out / "run", *TINY]
    dit = ["--data-dir", fake_mnist, "--out-dir", out / "dit", *TINY_DIT, "--epochs", "1"]
    first, second, dit_run = torchrun(out / "probe", run + ["--epochs", "1"], run + ["--epochs", "2", "--resume"], dit)
    ckpt_after_first = torch.load(out / "probe" / "run0_ckpt.pt", weights_only=True)
    return (out, first, ckpt_after_first, second), dit_run


@pytest.fixture(scope="module")
def ddp_run(ddp_runs):
    return ddp_runs[0]


def test_ranks_hold_identical_weights_after_every_step(ddp_run):
    _, (_, ranks), _, (_, resumed) = ddp_run
    for r0, r1 in (ranks, resumed):
        assert len(r0["weights"]) == len(r1["weights"]) == 8
        for step, (w0, w1, e0, e1) in enumerate(zip(r0["weights"], r1["weights"], r0["ema"], r1["ema"])):
            assert torch.equal(w0, w1), f"weights differ at step {step}"
            assert torch.equal(e0, e1), f"EMA differs at step {step}"
        assert not torch.equal(r0["weights"][0], r0["weights"][-1])  # and they did train


def test_a_dit_trains_in_lockstep_under_torchrun_and_loads_in_sample_py(ddp_runs, tmp_path):
    import sample
    (out, *_), (stdout, (r0, r1)) = ddp_runs
    assert len(r0["weights"]) == len(r1["weights"]) == 8
    assert all(torch.equal(w0, w1) for w0, w1 in zip(r0["weights"], r1["weights"]))
    assert not torch.equal(r0["weights"][0], r0["weights"][-1])
    assert not any(torch.equal(a, b) for a, b in zip(r0["timesteps"], r1["timesteps"]))
    assert torch.load(out / "dit" / "ckpt.pt", weights_only=True)["config"]["arch"] == "dit"
    sample.main(["--ckpt", str(out / "dit" / "ckpt.pt"), "--n", "4", "--device", "cpu", "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").exists()


def test_each_rank_takes_its_share_and_an_epoch_sees_every_digit_once(ddp_run, fake_mnist):
    import ddpm
    _, (_, ranks), _, _ = ddp_run
    train_x, _ = ddpm.load_mnist(fake_mnist, train=True, device=torch.device("cpu"))
    seen = []
    for rank in ranks:
        shares = rank["images"][:8]  # the training batches come first, then the test loss's
        assert all(s.shape == (16, 28, 28) for s in shares)  # half of the global batch each
        seen += [img for s in shares for img in s]
    assert sorted(img.numpy().tobytes() for img in seen) == sorted(img.numpy().tobytes() for img in train_x)


def test_ranks_draw_their_own_noise(ddp_run):
    _, (_, ranks), _, (_, resumed) = ddp_run
    for r0, r1 in (ranks, resumed):
        assert not any(torch.equal(a, b) for a, b in zip(r0["timesteps"][:8], r1["timesteps"][:8]))


def test_rank_zero_alone_writes_and_the_checkpoint_loads_in_sample_py(ddp_run, tmp_path):
    import sample
    out, (stdout, ranks), _, _ = ddp_run
    assert ranks[0]["checkpoints"] >= 1 and ranks[0]["grids"] >= 1
    assert ranks[1]["checkpoints"] == 0 and ranks[1]["grids"] == 0
    assert stdout.count("ddpm: ") == 1  # one log, rank 0's
    assert "x 2 processes (16 images each)" in stdout
    sample.main(["--ckpt", str(out / "run" / "ckpt.pt"), "--n", "4", "--device", "cpu", "--out",
                 str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").exists()


def test_a_resumed_ddp_run_continues_the_step_count(ddp_run):
    out, (_, first), ckpt_after_first, (stdout, resumed) = ddp_run
    assert ckpt_after_first["step"] == 8
    assert "resumed at step 8" in stdout
    assert torch.load(out / "run" / "ckpt.pt", weights_only=True)["step"] == 16
    # the checkpoint holds the weights of the last step, and the resumed ranks start from them
    saved = torch.cat([p.flatten() for p in ckpt_after_first["model"].values()])  # the U-Net has no buffers
    assert torch.equal(saved, first[0]["weights"][-1])
    assert 0 < (resumed[0]["weights"][0] - saved).abs().max() < 0.01  # one small step away


def test_a_global_batch_that_does_not_split_is_one_line(fake_mnist, tmp_path, monkeypatch, capsys):
    import ddpm
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: checked before any process group
    with pytest.raises(SystemExit) as e:
        ddpm.main(["--data-dir", fake_mnist, "--out-dir", str(tmp_path / "x"), *TINY, "--batch-size", "31"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 31 (the global batch) does not split evenly over 2 processes" in err[0]
    assert not (tmp_path / "x").exists()
