"""The levers of the training recipe (issue 31) against independent computations: the learning-rate
schedule at known steps, the Min-SNR weights at known SNRs, and the --minutes plan that fixes a
run's length."""
import argparse
import re

import pytest
import torch

import ddpm

torch.set_num_threads(2)


def lr_args(schedule, lr=1.0, warmup=10):
    return argparse.Namespace(lr=lr, warmup_steps=warmup, lr_schedule=schedule)


def test_the_learning_rate_warms_up_then_follows_a_half_cosine_to_zero():
    args = lr_args("cosine")  # warm-up over 10 steps, 110 steps in all: the cosine spans steps 10 .. 110
    assert ddpm.learning_rate(0, 110, args) == pytest.approx(0.1)  # (0 + 1) / 10
    assert ddpm.learning_rate(4, 110, args) == pytest.approx(0.5)
    assert ddpm.learning_rate(10, 110, args) == pytest.approx(1.0)  # the peak, progress 0
    assert ddpm.learning_rate(35, 110, args) == pytest.approx((1 + 2 ** -0.5) / 2)  # progress 1/4: (1 + cos(pi/4)) / 2
    assert ddpm.learning_rate(60, 110, args) == pytest.approx(0.5)  # half way
    assert ddpm.learning_rate(85, 110, args) == pytest.approx((1 - 2 ** -0.5) / 2)  # progress 3/4
    assert 0 < ddpm.learning_rate(109, 110, args) < 3e-4  # the last step: (1 + cos(0.99 pi)) / 2 = 2.5e-4
    assert ddpm.learning_rate(500, 110, args) == 0.0  # past the end (a run cut short by nothing): zero
    steps = [ddpm.learning_rate(k, 110, args) for k in range(10, 110)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # decays monotonically after the warm-up
    constant = lr_args("constant", lr=2e-3)
    assert ddpm.learning_rate(4, 110, constant) == pytest.approx(1e-3)
    assert ddpm.learning_rate(109, 110, constant) == ddpm.learning_rate(10_000, 110, constant) == 2e-3


def snr_schedule(snrs):
    """A stand-in schedule whose steps 0, 1, ... have the given signal-to-noise ratios: ab = snr / (1 + snr)."""
    ab = torch.tensor([s / (1 + s) for s in snrs], dtype=torch.float64).float()
    return {"alpha_bar": ab}


@pytest.mark.parametrize("pred, expected", [
    ("eps", [1.0, 1.0, 5 / 50]),                   # min(snr, 5) / snr
    ("x0", [0.5, 5.0, 5.0]),                       # min(snr, 5)
    ("v", [0.5 / 1.5, 5 / 6, 5 / 51]),             # min(snr, 5) / (snr + 1)
])
def test_min_snr_weights_at_known_snrs(pred, expected):
    sched, t = snr_schedule([0.5, 5.0, 50.0]), torch.arange(3)
    x0, noise = torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    _, weight = ddpm.training_target_and_weight(sched, x0, noise, t, pred, min_snr_gamma=5.0)
    assert torch.allclose(weight.flatten(), torch.tensor(expected), rtol=1e-5)
    _, plain = ddpm.training_target_and_weight(sched, x0, noise, t, pred)  # gamma 0: Ho's eps-loss weights
    assert torch.allclose(plain.flatten(), torch.tensor({"eps": [1.0] * 3, "x0": [0.5, 5.0, 50.0],
                                                         "v": [1 / 3, 5 / 6, 50 / 51]}[pred]), rtol=1e-5)


def test_the_min_snr_v_loss_is_the_capped_eps_loss_of_the_same_prediction():
    """The weighted v-MSE of a random prediction equals min(snr, gamma)/snr times the eps-MSE of the
    eps that prediction implies (eps_hat = sqrt(1 - ab) x_t + sqrt(ab) v_hat): Hang et al.'s weight."""
    gen = torch.Generator().manual_seed(0)
    sched, t = snr_schedule([0.2, 3.0, 40.0, 900.0]), torch.arange(4)
    x0, noise, v_hat = (torch.randn(4, 1, 3, 3, generator=gen) for _ in range(3))
    ab = sched["alpha_bar"].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target, weight = ddpm.training_target_and_weight(sched, x0, noise, t, "v", min_snr_gamma=5.0)
    v_loss = (weight * (v_hat - target) ** 2).flatten(1).mean(1)
    eps_hat = (1 - ab).sqrt() * x_t + ab.sqrt() * v_hat
    snr = torch.tensor([0.2, 3.0, 40.0, 900.0])
    eps_loss = ((eps_hat - noise) ** 2).flatten(1).mean(1) * snr.clamp(max=5.0) / snr
    assert torch.allclose(v_loss, eps_loss, rtol=1e-4)


def minutes_run(monkeypatch, clock, data_dir, out):
    """A tiny --minutes run's flags (all but --minutes), with the budget reading `clock` and planning
    after 10 steps, not 50 (a shorter test)."""
    monkeypatch.setattr(ddpm.TimeBudget, "clock", staticmethod(clock))
    monkeypatch.setattr(ddpm.TimeBudget, "PLAN_AFTER", 10)
    monkeypatch.setattr(ddpm.TimeBudget, "SKIP", 2)
    return ["--data-dir", str(data_dir), "--out-dir", str(out), "--channels", "8", "--channel-mult", "1,2",
            "--num-blocks", "1", "--no-attention", "--timesteps", "20", "--batch-size", "8", "--epochs", "1000",
            "--eval-images", "0", "--sample-every", "100000", "--num-samples", "4", "--lr-schedule", "cosine",
            "--warmup-steps", "5", "--log-every", "100000"]


def test_a_minutes_run_is_planned_stops_at_its_plan_and_resumes_exactly(fake_mnist, tmp_path, capsys, monkeypatch):
    """--minutes with the cosine schedule: the length is fixed from the first steps' speed and kept
    in the checkpoint; the run ends there with the learning rate near 0; a --resume with the same
    --minutes keeps the plan (nothing left to train), another --minutes plans anew. The budget's
    clock ticks 30 ms at every reading (about one a step), so the step counts do not depend on this
    machine's speed (with the real clock a slow machine spent 0.03 minutes before the plan)."""
    now = [0.0]

    def ticking_clock():
        now[0] += 0.03
        return now[0]

    out = tmp_path / "run"
    common = minutes_run(monkeypatch, ticking_clock, fake_mnist, out)
    ddpm.main([*common, "--minutes", "0.03"])  # 1.8 s of this clock: 60 readings
    log = capsys.readouterr().out
    first = torch.load(out / "ckpt.pt", weights_only=True)
    planned = first["planned_steps"]  # the plan after its revision halfway (at an even speed: about the same)
    first_plan = int(re.search(r"so the run is planned as (\d+) steps", log).group(1))
    assert abs(planned - first_plan) <= 3 and first["planned_minutes"] == 0.03, log
    assert first["step"] == planned and 40 < planned < 60, log  # about one reading a step, 5% kept back
    assert "spent at step" not in log  # the plan ended the run, not the clock
    assert first["optimizer"]["param_groups"][0]["lr"] < 0.01 * 5e-4  # the last step's rate: near zero
    assert first["train_seconds"] <= 0.03 * 60 + 0.03  # (within one reading: the last step's)
    ddpm.main([*common, "--minutes", "0.03", "--resume"])
    again = torch.load(out / "ckpt.pt", weights_only=True)
    assert again["step"] == planned and "planned as" not in capsys.readouterr().out  # the same plan, kept
    ddpm.main([*common, "--minutes", "0.05", "--resume"])
    longer = torch.load(out / "ckpt.pt", weights_only=True)
    assert longer["planned_minutes"] == 0.05 and longer["step"] == longer["planned_steps"] > planned + 20


def test_a_minutes_plan_is_revised_halfway_when_the_steps_slow_down(fake_mnist, tmp_path, capsys, monkeypatch):
    """The first steps' speed fixes a plan; when the steps after it run slower (the clock here
    ticks 20 ms a reading for the first 15 readings, then 40 ms), the revision halfway to the
    planned end shortens it to what fits, and the run ends at the revised plan, not by the clock;
    the checkpoint says no revision is left, so a --resume with the same --minutes keeps it."""
    readings = []

    def slowing_clock():
        readings.append(0.02 if len(readings) < 15 else 0.04)
        return sum(readings)

    out = tmp_path / "run"
    common = minutes_run(monkeypatch, slowing_clock, fake_mnist, out)
    ddpm.main([*common, "--minutes", "0.03"])
    log = capsys.readouterr().out
    first = re.search(r"so the run is planned as (\d+) steps", log)
    revised = re.search(r"so the plan is revised to (\d+) steps", log)
    assert first and revised, log
    first, revised = int(first.group(1)), int(revised.group(1))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert revised < 0.8 * first  # the steps after the plan took twice as long
    assert ckpt["step"] == ckpt["planned_steps"] == revised and "spent at step" not in log, log
    assert ckpt["revise_plan_at"] is None  # no revision left for a resume
    ddpm.main([*common, "--minutes", "0.03", "--resume"])
    assert "planned as" not in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == revised
