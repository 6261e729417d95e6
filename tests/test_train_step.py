"""ddpm.py's training step (make_train_step, and its recording on a GPU by replayable) against
a plain training loop written out here: the same losses and weights."""
import argparse
import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm

CONFIG = dict(channels=8, channel_mult="1,2", num_blocks=1, attention=True, dropout=0.0, arch="resnet", class_cond=True,
              pred="v", p_uncond=0.3, grad_clip=0.05, lr=2e-3, warmup_steps=5, ema_decay=0.9999, min_snr_gamma=0.0)


def lr_at(step):
    return CONFIG["lr"] * min(1.0, (step + 1) / CONFIG["warmup_steps"])


def plain_loop(net, ema, sched, images, labels, steps):
    """The textbook loop: a float learning rate set in the optimizer, the EMA by its formula.
    (Adam amplifies round-off: a gradient that is zero but for round-off moves a weight by a
    whole learning rate, so both loops use torch's fused AdamW and clipping.)"""
    opt = torch.optim.AdamW(net.parameters(), lr=CONFIG["lr"], weight_decay=0.0, fused=True)  # torch's own kernel
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        y = ddpm.drop_labels(labels[step], CONFIG["p_uncond"], net.null_label)
        loss, _ = ddpm.diffusion_loss(lambda x, t: net(x, t, y), sched, images[step].unsqueeze(1) / 127.5 - 1, "v")
        opt.zero_grad()
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CONFIG["grad_clip"])
        opt.step()
        d = ddpm.ema_decay(step, CONFIG["ema_decay"])
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.copy_(d * e + (1 - d) * p)
        losses.append(loss.detach())
    return torch.stack(losses)


def step_function(net, ema, sched, images, labels, steps, compile=False):
    """The loop of ddpm.train(): the learning rate and the decay as device tensors filled each step."""
    lr, decay = torch.tensor(CONFIG["lr"]), torch.tensor(0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **ddpm.adam_options(torch.device("cpu")))
    model_fn = ddpm.make_model_fn(net, torch.device("cpu"), amp=False, compile=compile)
    train_step = ddpm.make_train_step(model_fn, net, ema, opt, sched, argparse.Namespace(**CONFIG))
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        lr.fill_(lr_at(step))
        decay.fill_(ddpm.ema_decay(step, CONFIG["ema_decay"]))
        loss, t = train_step(images[step], labels[step], decay)
        assert t.shape == (images.shape[1],) and t.dtype == torch.long
        losses.append(loss)
    return torch.stack(losses)


def setup_pair(steps=20, batch=8, config=CONFIG):
    torch.manual_seed(0)
    net = ddpm.build_model(config)
    with torch.no_grad():  # every weight nonzero, so each one is trained and compared
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = copy.deepcopy(net).requires_grad_(False)
    images = torch.randint(0, 256, (steps, batch, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (steps, batch))
    return net, ema, copy.deepcopy(net), copy.deepcopy(ema), ddpm.make_schedule("cosine", 20), images, labels


def test_the_step_function_trains_as_the_plain_loop():
    net_a, ema_a, net_b, ema_b, sched, images, labels = setup_pair()
    expected = plain_loop(net_a, ema_a, sched, images, labels, 20)
    got = step_function(net_b, ema_b, sched, images, labels, 20)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (got - expected).abs().max()
    # The trained networks compute the same function. (Weights are compared through it: a conv
    # bias right before a one-channel GroupNorm group has a gradient that is zero but for
    # round-off, and Adam moves it by a whole learning rate in the round-off's direction.)
    x, t, y = torch.randn(8, 1, 28, 28), torch.randint(0, 20, (8,)), torch.arange(8)
    with torch.no_grad():
        for a, b in ((net_a, net_b), (ema_a, ema_b)):
            out_a, out_b = a(x, t, y), b(x, t, y)
            assert torch.allclose(out_a, out_b, rtol=1e-3, atol=1e-5), (out_a - out_b).abs().max()
        assert (net_b(x, t, y) - ema_b(x, t, y)).abs().max() > 1e-3  # the EMA lags the weights


class OpRecorder(TorchDispatchMode):
    """The names of the aten ops that run inside it."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", [CONFIG, dict(CONFIG, arch="dit", patch_size=7, width=16, depth=1, heads=2)],
                         ids=["unet", "dit"])
def test_the_step_never_reads_a_number_back_to_the_host(config):
    """A CUDA graph cannot record a read of a device number by the host (tensor.item(), or a 0-d
    tensor passed where a Python number is expected), and in an eager step each such read stalls
    until the GPU catches up. On the CPU the read shows as the op aten._local_scalar_dense: none
    may run in a step whose learning rate and EMA decay are tensors, with either network. (The EMA update as
    torch._foreach_lerp_(ema, params, 1 - decay) was one: _foreach_lerp_ takes no tensor weight.)"""
    net, ema, _, _, sched, images, labels = setup_pair(steps=2, batch=4, config=config)
    assert type(net).__name__ == {"dit": "DiT"}.get(config["arch"], "UNet")
    lr, decay = torch.tensor(CONFIG["lr"]), torch.tensor(0.5)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **ddpm.adam_options(torch.device("cpu")))
    train_step = ddpm.make_train_step(ddpm.make_model_fn(net, torch.device("cpu"), amp=False), net, ema, opt, sched,
                                      argparse.Namespace(**config))
    train_step(images[0], labels[0], decay)  # the first step creates the optimizer's state
    with OpRecorder() as recorder:
        train_step(images[1], labels[1], decay)
    assert any("_fused_adamw_" in op for op in recorder.ops) and any("_foreach_" in op for op in recorder.ops)
    assert not [op for op in recorder.ops if "_local_scalar_dense" in op]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_recorded_step_trains_as_the_eager_step_on_a_gpu(capsys):
    """The same 10 steps eagerly and recorded: a recording draws its random numbers from the same
    generator at the same offsets as the eager step, so both runs see the same timesteps, labels
    dropped and noise, and train the same function. (Compared through the trained functions, as
    above, with room for the GPU's non-deterministic sums and TF32.)"""
    device = torch.device("cuda")
    runs, benchmark = [], torch.backends.cudnn.benchmark
    try:
        for record in (False, True):
            torch.backends.cudnn.benchmark = True  # as replayable() sets it: the same algorithms in both runs
            net_a, ema_a, _, _, _, images, labels = setup_pair(steps=10, batch=16)
            net, ema = net_a.to(device), ema_a.to(device)
            sched = ddpm.make_schedule("cosine", 20, device)
            lr, decay = torch.tensor(CONFIG["lr"], device=device), torch.tensor(0.0, device=device)
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, **ddpm.adam_options(device))
            step_fn = ddpm.make_train_step(ddpm.make_model_fn(net, device, False), net, ema, opt, sched,
                                           argparse.Namespace(**CONFIG))
            step_fn = ddpm.replayable(step_fn, device, enabled=record)
            torch.cuda.manual_seed(0)
            timesteps = []
            for step in range(10):
                lr.fill_(lr_at(step))
                decay.fill_(ddpm.ema_decay(step, CONFIG["ema_decay"]))
                timesteps.append(step_fn(images[step].to(device), labels[step].to(device), decay)[1].clone())
            runs.append((net, ema, torch.stack(timesteps)))
    finally:
        torch.set_autocast_cache_enabled(True)
        torch.backends.cudnn.benchmark = benchmark
    out = capsys.readouterr().out
    assert "recording of the step as a CUDA graph" in out and "could not record" not in out, out
    (net_e, ema_e, t_e), (net_r, ema_r, t_r) = runs
    assert torch.equal(t_e, t_r), "the recorded steps drew other timesteps than the eager ones (RNG offsets)"
    x, t = torch.randn(8, 1, 28, 28, device=device), torch.randint(0, 20, (8,), device=device)
    y = torch.arange(8, device=device)
    with torch.no_grad():
        for a, b in ((net_e, net_r), (ema_e, ema_r)):
            out_a, out_b = a(x, t, y), b(x, t, y)
            assert torch.isfinite(out_b).all()
            assert torch.allclose(out_a, out_b, rtol=1e-2, atol=1e-3), (out_a - out_b).abs().max()


class TinyNet(torch.nn.Module):
    """A network with the U-Net's call signature, small enough to compile in a second or two."""
    def __init__(self):
        super().__init__()
        self.conv, self.time = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Embedding(20, 1)

    def forward(self, x, t):
        return self.conv(x) + self.time(t).view(-1, 1, 1, 1)


class StandInGraph:
    """torch.cuda.CUDAGraph's stand-in: a real recording runs nothing and a replay re-runs the
    recorded kernels on the recorded tensors; here the recording runs the step once (noted as
    such) and replay() calls it again on the recorded inputs, writing into the recorded outputs."""
    current = None

    def __init__(self):
        self.run = self.outputs = None

    def replay(self):
        for recorded, new in zip(self.outputs, self.run()):
            recorded.copy_(new)


@contextlib.contextmanager
def stand_in_recording(graph, **_):
    StandInGraph.current = graph
    try:
        yield
    finally:
        StandInGraph.current = None


def replay_on_stand_ins(monkeypatch, steps, fail_recording=False):
    """ddpm.replayable's logic on the CPU: torch.compile (aot_eager), bf16 autocast and a
    tensor learning rate and decay as train() has them, CUDA's streams and graph replaced by
    stand-ins. Returns, per call of the step function: (phase, the images it saw), and the losses."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # a property of the module: restored as it was
    monkeypatch.setattr(torch.cuda, "Stream", lambda: argparse.Namespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: argparse.Namespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    if fail_recording:
        def stand_in_recording_fails(graph, **_):
            raise RuntimeError("operation not permitted when stream is capturing")
        monkeypatch.setattr(torch.cuda, "graph", stand_in_recording_fails)
    else:
        monkeypatch.setattr(torch.cuda, "graph", stand_in_recording)
    torch.manual_seed(0)
    net = TinyNet()
    ema = copy.deepcopy(net).requires_grad_(False)
    lr, decay = torch.tensor(1e-2), torch.tensor(0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, fused=True)
    model_fn = ddpm.make_model_fn(torch.compile(net, backend="aot_eager"), torch.device("cpu"), amp=True)
    config = argparse.Namespace(**{**CONFIG, "class_cond": False})
    step_fn = ddpm.make_train_step(model_fn, net, ema, opt, ddpm.make_schedule("cosine", 20), config)
    seen = []

    def spy(images, labels, decay):
        graph = StandInGraph.current
        seen.append(("recording" if graph else "replay" if spy.recorded else "eager", images.clone()))
        out = step_fn(images, labels, decay)
        if graph:
            graph.run, graph.outputs, spy.recorded = lambda: spy(images, labels, decay), out, True
        return out
    spy.recorded = False
    images = torch.randint(0, 256, (steps, 4, 28, 28), dtype=torch.uint8)
    losses = []
    # torch's config modules keep their values outside the module's __dict__, so pytest's
    # monkeypatch (9.2) deletes the entry when it undoes a patch; the config's own patch()
    # restores it, also after replayable() turns suppress_errors on for its run.
    with torch._dynamo.config.patch(suppress_errors=False):
        run = ddpm.replayable(spy, torch.device("cuda"), enabled=True)
        try:
            for step in range(steps):
                if step == 3:  # from here on a recompile of the network is an error
                    torch.compiler.set_stance("fail_on_recompile")
                lr.fill_(1e-2 / (1 + step))
                decay.fill_(ddpm.ema_decay(step, 0.999))
                loss, t = run(images[step], torch.zeros(4, dtype=torch.long), decay)
                losses.append(loss.clone())
        finally:
            torch.compiler.set_stance("default")
            torch.set_autocast_cache_enabled(True)
            torch._dynamo.reset()
    return seen, images, torch.stack(losses)


def test_replayable_warms_up_records_once_and_replays_each_steps_inputs(monkeypatch, capsys):
    seen, images, losses = replay_on_stand_ins(monkeypatch, steps=7)
    out = capsys.readouterr().out
    # The recording did not recompile the network: autocast's cache is off from the first warm-up
    # step (turned off only to record, the compiled network's guard on it failed while recording).
    assert "recording of the step as a CUDA graph" in out and "could not record" not in out, out
    assert [phase for phase, _ in seen] == ["eager"] * 3 + ["recording"] + ["replay"] * 4
    # (the stand-in ran the step while recording, as no real recording does: that call is extra)
    for step, (_, seen_images) in zip([0, 1, 2, 3, 4, 5, 6], seen[:3] + seen[4:]):
        assert torch.equal(seen_images, images[step])  # each replay trained on that step's digits
    assert torch.isfinite(losses).all() and len(set(losses.flatten().tolist())) > 20


def test_the_stand_in_run_leaves_torchs_configuration_as_it_found_it(monkeypatch):
    """replayable() turns dynamo's suppress_errors on for its run; a test of it restores the value
    and keeps the entry (undone by pytest's monkeypatch, the entry was deleted for the rest of the
    process, and the next test to patch it failed with AttributeError)."""
    before = torch._dynamo.config.suppress_errors
    replay_on_stand_ins(monkeypatch, steps=1)
    monkeypatch.undo()
    assert torch._dynamo.config.suppress_errors == before and "suppress_errors" in torch._dynamo.config.get_config_copy()


def test_a_failed_recording_is_one_line_and_training_goes_on_eagerly(monkeypatch, capsys):
    seen, images, losses = replay_on_stand_ins(monkeypatch, steps=5, fail_recording=True)
    out = capsys.readouterr().out
    assert out.count("could not record the training step as a CUDA graph (RuntimeError") == 1
    assert [phase for phase, _ in seen] == ["eager"] * 5
    assert all(torch.equal(s, x) for (_, s), x in zip(seen, images)) and torch.isfinite(losses).all()
