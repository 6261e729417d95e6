"""discrete_diffusion.py: the D3PM math against independent computations (matrices built here
from the papers' formulas, products and Bayes' rule by enumeration, torch.distributions KLs, a
toy distribution whose entropy is known), then the script end to end on the fake MNIST."""
import itertools
import json
import math
import os

import pytest
import torch

import discrete_diffusion as dd
from conftest import run_in_process

TRANSITIONS = [("uniform", 3), ("absorbing", 3), ("gaussian", 4)]


def paper_matrices(transition, K, T):
    """Q_t built here from D3PM's definitions (appendix A.2), entry by entry, float64."""
    if transition == "absorbing":
        betas = [1.0 / (T - t) for t in range(T)]  # D3PM: 1 / (T - t + 1), 1-indexed
    elif transition == "uniform":
        f = [math.cos(((u / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for u in range(T + 1)]
        betas = [1 - f[t + 1] / f[t] for t in range(T)]
    else:
        betas = [(1e-4 + (0.02 - 1e-4) * t / (T - 1)) * 1000 / T for t in range(T)]
    S = K + 1 if transition == "absorbing" else K
    out = []
    for b in betas:
        Q = torch.zeros(S, S, dtype=torch.float64)
        for i in range(S):
            for j in range(S):
                if transition == "uniform":
                    Q[i, j] = (1 - b) * (i == j) + b / K
                elif transition == "absorbing":
                    Q[i, j] = 1.0 * (j == i) if i == K else (1 - b) * (i == j) + b * (j == K)
                elif i != j:
                    norm = sum(math.exp(-4 * n * n / ((K - 1) ** 2 * b)) for n in range(-(K - 1), K))
                    Q[i, j] = math.exp(-4 * (i - j) ** 2 / ((K - 1) ** 2 * b)) / norm
            if transition == "gaussian":
                Q[i, i] = 1 - Q[i].sum()
        out.append(Q)
    return torch.stack(out)


def products(Q):
    """Q-bar_t = Q_0 Q_1 ... Q_t by brute force."""
    out, acc = [], torch.eye(Q.shape[-1], dtype=torch.float64)
    for q in Q:
        acc = acc @ q
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("transition,K", TRANSITIONS)
def test_matrices_are_the_papers_and_q_bar_is_their_product(transition, K):
    T = 6
    Q, Q_bar, prior = dd.transition_matrices(transition, K, T)
    assert torch.allclose(Q, paper_matrices(transition, K, T), atol=1e-12)
    assert torch.allclose(Q_bar, products(Q), atol=1e-12)
    sched = dd.make_schedule(transition, K, T)  # the stored logs, one step behind, with Q-bar_{-1} = I
    assert torch.allclose(sched["log_Q_bar"][0].exp(), torch.eye(Q.shape[-1], dtype=torch.float32))
    assert torch.allclose(sched["log_Q_bar"][1:].exp(), Q_bar.float(), atol=1e-6)
    assert torch.allclose(sched["log_Q"].exp(), Q.float(), atol=1e-6)


@pytest.mark.parametrize("transition,K,T", [("uniform", 2, 1000), ("absorbing", 2, 1000), ("uniform", 256, 4),
                                            ("absorbing", 256, 4), ("gaussian", 256, 5), ("gaussian", 5, 200)])
def test_rows_sum_to_one(transition, K, T):
    Q, Q_bar, prior = dd.transition_matrices(transition, K, T)
    assert (Q >= 0).all() and (Q_bar >= 0).all()
    assert torch.allclose(Q.sum(-1), torch.ones(Q.shape[:2], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Q_bar.sum(-1), torch.ones(Q.shape[:2], dtype=torch.float64), atol=1e-10)
    assert math.isclose(prior.sum().item(), 1.0)


def test_schedules_end_fully_mixed():
    T = 50
    _, Q_bar, _ = dd.transition_matrices("absorbing", 2, T)
    alpha_bar = Q_bar[:, 0, 0]  # the chance a pixel is not masked yet: linear to 0 (mutual-information schedule)
    assert torch.allclose(alpha_bar, 1 - torch.arange(1, T + 1, dtype=torch.float64) / T, atol=1e-12)
    assert torch.equal(Q_bar[-1][:, 2], torch.ones(3, dtype=torch.float64))  # x_{T-1} is [MASK] from any x0
    _, Q_bar, _ = dd.transition_matrices("uniform", 3, T)
    assert torch.allclose(Q_bar[-1], torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=1e-12)
    sched = dd.make_schedule("absorbing", 2, T)
    x0 = torch.randint(0, 2, (5, 28, 28))
    assert (dd.q_sample(sched, x0, torch.full((5,), T - 1)) == 2).all()  # every pixel [MASK] at t = T-1
    assert (dd.q_sample(sched, x0, torch.zeros(5, dtype=torch.long)) != (1 - x0)).all()  # never the other colour
    assert dd.prior_kl(sched, x0).abs().max() < 1e-6
    assert (dd.sample_categorical(sched["log_prior"].expand(3, 4, 4, -1)) == 2).all()  # the sampler starts all-[MASK]


@pytest.mark.parametrize("transition,K", TRANSITIONS)
def test_posterior_is_bayes_rule(transition, K):
    T = 5
    Q = paper_matrices(transition, K, T)
    Q_bar = products(Q)
    S = Q.shape[-1]
    sched = dd.make_schedule(transition, K, T)
    cases = [(x0, xt, t) for x0 in range(K) for xt in range(S) for t in range(T) if Q_bar[t, x0, xt] > 0]
    x0, xt, t = (torch.tensor(c).view(-1, 1, 1) for c in zip(*cases))
    got = dd.q_posterior_logits(sched, x0, xt, t.view(-1)).exp().view(len(cases), S).double()
    for row, (a, b, s) in zip(got, cases):
        if s == 0:  # the step to x0: x0 itself
            want = torch.eye(S, dtype=torch.float64)[a]
        else:  # q(x_{t-1} = j | x_t, x0) = q(x_t | j) q(j | x0) / q(x_t | x0), enumerated over j
            joint = torch.tensor([Q[s, j, b] * Q_bar[s - 1, a, j] for j in range(S)])
            assert math.isclose(joint.sum().item(), Q_bar[s, a, b].item(), rel_tol=1e-9)  # the marginal
            want = joint / Q_bar[s, a, b]
        assert torch.allclose(row, want, atol=1e-5), (a, b, s, row, want)
    # a network certain of the true x0 has the true posterior as its reverse step (D3PM eq. 4), and
    # posterior_logits with one-hot weights is q_posterior_logits' shortcut
    sure = dd.one_hot_log(x0, K)
    assert torch.allclose(dd.p_logits(sched, sure, xt, t.view(-1)).exp(), got.float().view(len(cases), 1, 1, S),
                          atol=1e-5)


def test_absorbing_unmasks_at_a_rate_the_network_does_not_choose():
    T, K = 10, 3
    sched = dd.make_schedule("absorbing", K, T)
    t = torch.arange(1, T)
    x_t = torch.full((T - 1, 1, 1), K)  # masked
    log_x0 = torch.randn(T - 1, 1, 1, K).log_softmax(-1)  # any belief about x0
    stay = dd.p_logits(sched, log_x0, x_t, t).exp()[:, 0, 0, K]
    alpha_bar = 1 - torch.arange(0, T + 1) / T  # alpha_bar_{t-1} at index t
    assert torch.allclose(stay, (1 - alpha_bar[t]) / (1 - alpha_bar[t + 1]), atol=1e-5)


def test_kl_terms_match_torch_distributions():
    from torch.distributions import Categorical, kl_divergence
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g) * 3, torch.randn(7, 5, generator=g) * 3
    want = kl_divergence(Categorical(logits=a), Categorical(logits=b))
    assert torch.allclose(dd.categorical_kl(a.log_softmax(-1), b.log_softmax(-1)), want, atol=1e-5)
    # the prior term of a schedule that does not quite end mixed (gaussian, few steps), summed over pixels
    sched = dd.make_schedule("gaussian", 4, 3)
    x0 = torch.randint(0, 4, (2, 3, 3), generator=g)
    q = Categorical(probs=sched["log_Q_bar"][3][x0].exp())
    want = kl_divergence(q, Categorical(probs=torch.full((4,), 0.25))).sum((1, 2))
    assert torch.allclose(dd.prior_kl(sched, x0), want, atol=1e-5) and (want > 0.01).all()


def test_reverse_grid_composes_the_steps():
    sched = dd.make_schedule("gaussian", 4, 12)
    Q = sched["log_Q"].double().exp()
    steps = list(dd.reverse_grid(sched, 4))
    assert [t for t, _, _ in steps] == [11, 8, 5, 2]
    for i, (t, log_step, log_bar_s) in enumerate(steps):
        s = steps[i + 1][0] if i + 1 < len(steps) else -1
        want = torch.eye(4, dtype=torch.float64)
        for u in range(s + 1, t + 1):
            want = want @ Q[u]
        assert torch.allclose(log_step.double().exp(), want, atol=1e-5)
        # q(x_t | x0) = q(x_s | x0) q(x_t | x_s): the coarse chain keeps the marginals
        assert torch.allclose(log_bar_s.double().exp() @ want, sched["log_Q_bar"][t + 1].double().exp(), atol=1e-5)
    assert all(torch.equal(a, sched["log_Q"][t]) for t, a, _ in dd.reverse_grid(sched, 12))  # all steps: Q_t


# --- a toy distribution with a known entropy: 2x2 binary images -------------------------------

TOY = {(0, 0, 0, 0): 0.4, (1, 0, 0, 1): 0.3, (1, 1, 0, 0): 0.2, (1, 1, 1, 1): 0.1}


def exact_denoiser(sched):
    """model_fn of the best p~(x0 | x_t) for D3PM eq. 4, per pixel. The true reverse step of a pixel is
    sum_x0 q(x_{t-1} | x_t, x0) q(x0 | x_t) = sum_x0 q(x_{t-1}, x_t | x0) [q(x0 | x_t) / q(x_t | x0)], so eq. 4
    is exact with p~ proportional to q(x0_i | x_t) / q(x_t,i | x0_i) (the posterior itself where q(x_t | x0)
    does not depend on x0, as for a masked pixel), q(x0 | x_t) proportional to p(x0) prod_i Q-bar_t[x0_i, x_t_i]."""
    images = torch.tensor(list(TOY)).view(-1, 2, 2)
    log_prior = torch.tensor(list(TOY.values())).log()
    Q_bar = sched["log_Q_bar"].double().exp()

    def model_fn(one_hot, t):
        x_t = one_hot.argmax(1)  # (B, 2, 2)
        rows = Q_bar[t + 1]  # (B, S, S): q(x_t | x0) = Q-bar_t[x0, x_t]
        lik = torch.stack([rows[torch.arange(len(t))[:, None, None], img, x_t] for img in images], 1)
        log_post = log_prior.double() + lik.clamp(min=1e-300).log().sum((2, 3))  # (B, images)
        post = log_post.softmax(1)
        marg = torch.stack([(post[:, :, None, None] * (images == k)).sum(1) for k in range(2)], 1)  # (B, K, 2, 2)
        lik = torch.stack([rows[torch.arange(len(t))[:, None, None], k, x_t] for k in range(2)], 1)  # q(x_t,i | k)
        ratio = torch.where(marg > 0, marg / lik.clamp(min=1e-300), 0.0)
        return ratio.clamp(min=1e-300).log().float()
    return model_fn


@pytest.mark.parametrize("transition", ["absorbing", "uniform"])
def test_exact_denoiser_bound_is_the_entropy_and_samples_are_the_toy(transition):
    T = 50
    sched = dd.make_schedule(transition, 2, T)
    model_fn, S = exact_denoiser(sched), sched["states"]
    entropy = -sum(p * math.log(p) for p in TOY.values())
    # the expected bound, E over x_t enumerated exactly (all S^4 images) for each toy image
    states = torch.tensor(list(itertools.product(range(S), repeat=4))).view(-1, 2, 2)
    Q_bar = sched["log_Q_bar"].double().exp()
    expected = 0.0
    for image, p in TOY.items():
        x0 = torch.tensor(image).view(1, 2, 2).expand(len(states), 2, 2)
        total = dd.prior_kl(sched, x0[:1]).item()
        for t in range(T):
            tt = torch.full((len(states),), t)
            weight = Q_bar[t + 1][x0, states].prod(-1).prod(-1)  # q(x_t | x0)
            log_p = dd.p_logits(sched, dd.x0_log_probs(model_fn, states, tt, S), states, tt)
            if t == 0:
                term = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum((1, 2))
            else:
                term = dd.categorical_kl(dd.q_posterior_logits(sched, x0, states, tt), log_p).sum((1, 2))
            total += (weight * term.double()).sum().item()
        expected += p * total
    # -log p(x0) <= bound, and with the exact denoiser and many small steps the gap is small
    # (each step draws the pixels independently given x_t: the only loss)
    # (measured gap at T = 50: 0.023 absorbing, 0.045 uniform; at T = 100: 0.011, 0.023)
    assert entropy - 1e-4 <= expected <= entropy + 0.06, (expected, entropy)
    # bound_nats (one x_t per step) averages to the same expectation
    x0 = torch.tensor(list(TOY)).view(-1, 2, 2).repeat_interleave(torch.tensor([200, 150, 100, 50]), 0)
    mc = dd.bound_nats(model_fn, sched, x0, torch.Generator().manual_seed(0))["total"].mean().item()
    assert abs(mc - expected) < 0.05, (mc, expected)
    # ancestral samples: the toy's distribution
    x = dd.sample(model_fn, sched, 2000, generator=torch.Generator().manual_seed(1), shape=(2, 2))
    counts = {img: 0 for img in TOY}
    for row in x.view(-1, 4).tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    tv = 0.5 * sum(abs(counts.get(img, 0) / 2000 - TOY.get(img, 0)) for img in set(counts) | set(TOY))
    assert tv < 0.05, counts


# --- data ----------------------------------------------------------------------------------------

def test_test_digits_are_vae_binarization_and_levels_quantize():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (50, 28, 28), generator=g, dtype=torch.uint8)
    args = type("A", (), {"levels": 2, "seed": 5})
    # vae.py's rule: the whole split drawn once, Bernoulli(k / 255), generator seeded seed + 2
    want = torch.bernoulli(images.unsqueeze(1).float() / 255, generator=torch.Generator().manual_seed(5 + 2))
    assert torch.equal(dd.test_categories(images, args, torch.device("cpu")), want.squeeze(1).long())
    assert torch.equal(dd.to_categories(images, 256), images.long())
    assert dd.to_categories(torch.tensor([[[0, 63, 64, 127, 128, 255]]], dtype=torch.uint8), 4).tolist() == \
        [[[0, 0, 1, 1, 2, 3]]]


# --- the script ----------------------------------------------------------------------------------

TINY = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--timesteps", "6", "--no-attention", "--batch-size", "16",
        "--log-every", "2", "--num-samples", "4", "--device", "cpu", "--sample-every", "5"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_main(capsys, data, out, *args):
    return run_in_process(dd.main, ["--data-dir", data, "--out-dir", out, *TINY, *args], capsys)


def test_cli_trains_writes_and_reports(run_script, fake_mnist, tmp_path):
    out = str(tmp_path / "run")
    proc = run_script("discrete_diffusion.py", "--data-dir", fake_mnist, "--out-dir", out, *TINY,
                      "--max-steps", "3", "--eval-images", "3")
    assert proc.returncode == 0, proc.stderr
    assert "img/s" in proc.stdout and "by t quarter" in proc.stdout and "nats per digit" in proc.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "corruption.png", "metrics.json", "samples.png",
                                       "samples_step_000003.png", "unmasking.png"]
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert ckpt["kind"] == "discrete_diffusion" and ckpt["step"] == 3 and set(ckpt["model"]) == set(ckpt["ema"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("config", "step", "epochs_done", "train_loss", "train_images_per_sec", "sample_images_per_sec",
                "wall_time_s", "train_seconds", "device", "parameters", "peak_memory_mb", "test_neg_elbo", "test_bpd",
                "test_bpd_prior", "test_bpd_kl", "test_bpd_decoder"):
        assert m[key] is not None, key
    assert math.isclose(m["test_bpd"], m["test_neg_elbo"] / (784 * math.log(2)), rel_tol=1e-6)
    assert math.isclose(m["test_bpd"], m["test_bpd_prior"] + m["test_bpd_kl"] + m["test_bpd_decoder"], rel_tol=1e-5)


def test_resume_is_exact_and_eval_only(capsys, fake_mnist, tmp_path, monkeypatch):
    """Also: --compile compiles the training network only; the samplers run eagerly, as in ddpm.py
    (torch.compile is recorded here, not run)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(net) or net)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--eval-images", "0", "--transition", "uniform")
    assert run_main(capsys, fake_mnist, straight, "--max-steps", "4", "--compile", *common)[0] == 0
    assert len(compiled) == 1 and all(p.requires_grad for p in compiled[0].parameters())  # not the EMA copy
    assert run_main(capsys, fake_mnist, split, "--max-steps", "2", *common)[0] == 0  # stops mid-epoch
    code, out, err = run_main(capsys, fake_mnist, split, "--max-steps", "4", "--resume", *common)
    assert code == 0 and "resumed at step 2" in out, err
    a, b = load(straight / "ckpt.pt"), load(split / "ckpt.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    code, out, err = run_main(capsys, fake_mnist, split, "--eval-only", "--eval-images", "2", "--sample-steps", "3",
                              "--compile")
    assert code == 0 and len(compiled) == 1, err
    assert "nats per digit" in out and json.load(open(split / "eval.json"))["test_bpd_images"] == 2
    assert {"eval_samples.png", "eval_corruption.png"} <= set(os.listdir(split))
    # sample.py draws from the checkpoint: a grid, the array, a trajectory strip
    import numpy as np
    import sample
    grid, array = str(split / "drawn.png"), str(split / "drawn.npz")
    sample.main(["--ckpt", str(split / "ckpt.pt"), "--n", "5", "--save-array", array, "--out", grid, "--trajectory",
                 "--device", "cpu"])
    drawn = np.load(array)["samples"]
    assert drawn.shape == (5, 1, 28, 28) and set(np.unique(drawn)) <= {0.0, 1.0}  # binary digits
    assert os.path.exists(grid) and os.path.exists(str(split / "drawn_trajectory.png"))
    with pytest.raises(SystemExit):  # a DDPM sampler flag for this kind: one line
        sample.main(["--ckpt", str(split / "ckpt.pt"), "--sampler", "ddim", "--device", "cpu"])
    assert "--sampler applies to" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--levels", "1"], "--levels"),
    (["--levels", "300"], "--levels"),
    (["--transition", "gaussian"], "gaussian"),
    (["--sample-steps", "7"], "--sample-steps"),
    (["--hybrid-coeff", "-1"], "--hybrid-coeff"),
    (["--channel-mult", "1,x"], "--channel-mult"),
    (["--transition", "masked"], "--transition"),
])
def test_bad_input_is_one_line(capsys, tmp_path, args, needle):
    code, out, err = run_main(capsys, tmp_path / "data", tmp_path / "out", *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and needle in lines[0], err
    assert not os.path.exists(tmp_path / "out")


def test_eval_only_without_checkpoint_is_one_line(capsys, tmp_path):
    code, out, err = run_main(capsys, tmp_path / "data", tmp_path / "nothing", "--eval-only")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no checkpoint" in err


def test_block_flag_and_a_checkpoint_that_named_it_arch():
    """--block names the U-Net's block, as in ddpm.py; a checkpoint from before the rename kept it
    under "arch" and still builds the same network."""
    config = vars(dd.parse_args(["--block", "shuffle", "--channels", "8", "--channel-mult", "1,2",
                                                 "--num-blocks", "1", "--no-attention"]))
    old = {k: v for k, v in config.items() if k != "block"} | {"arch": "shuffle"}
    shapes = lambda net: {k: v.shape for k, v in net.state_dict().items()}
    assert shapes(dd.build_model(old)) == shapes(dd.build_model(config))
    resnet = dd.build_model(config | {"block": "resnet"})
    assert shapes(resnet) != shapes(dd.build_model(config))


def test_a_checkpoint_that_named_the_block_arch_resumes_and_evaluates(capsys, fake_mnist, tmp_path):
    """A run from before --arch became --block: its config has "arch"; --resume and --eval-only
    take the block from there (a shuffle model would not load into resnet blocks)."""
    out = tmp_path / "old"
    common = ("--eval-images", "0", "--block", "shuffle")
    assert run_main(capsys, fake_mnist, out, "--max-steps", "2", *common)[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["config"]["arch"] = ckpt["config"].pop("block")
    torch.save(ckpt, out / "ckpt.pt")
    code, _, err = run_main(capsys, fake_mnist, out, "--max-steps", "3", "--resume", "--eval-images", "0")
    assert code == 0, err  # the command line's --block is resnet (the default): the checkpoint's shuffle wins
    code, _, err = run_main(capsys, fake_mnist, out, "--eval-only", "--eval-images", "2", "--sample-steps", "2")
    assert code == 0 and json.load(open(out / "eval.json"))["test_bpd_images"] == 2, err
