"""ddpm.py under torchrun, with probes:
`torchrun ... tests/ddp_worker.py PROBE_DIR <ddpm.py flags> [--then <ddpm.py flags>]...`.

Each rank runs ddpm.main() unchanged, once per group of flags (a run and then its --resume share
the processes: a torchrun start costs more than the run), except that a few of its functions are wrapped to record,
per optimizer step, this rank's weights and EMA, the digits it trained on and the timesteps it
drew, and how often it wrote a checkpoint or a grid. The records go to PROBE_DIR/rank<R>.pt for
tests/test_ddp.py to compare across ranks,
and rank 0 prints RUN_MARK between runs and keeps a copy of each run's checkpoint. Not a test module itself (no test_ prefix).
"""
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402

RUN_MARK = "=== next run ==="
record = {}


def probe(name, before=None, after=None):
    original = getattr(ddpm, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = original(*args, **kwargs)
        if after:
            after(out, *args, **kwargs)
        return out
    setattr(ddpm, name, wrapped)


def after_ema(out, ema_params, params, decay):  # ema_update: called once per step, after opt.step()
    record["weights"].append(torch.cat([p.detach().flatten() for p in params]).clone())
    record["ema"].append(torch.cat([p.flatten() for p in ema_params]).clone())


if __name__ == "__main__":  # (tests/test_ddp.py imports RUN_MARK: the probes go in only here)
    probe("ema_update", after=after_ema)
    probe("to_model_range", before=lambda images: record["images"].append(images.clone()))  # training batches first
    probe("diffusion_loss", after=lambda out, *a, **k: record["timesteps"].append(out[1].clone()))
    probe("save_checkpoint", before=lambda *a, **k: record.__setitem__("checkpoints", record["checkpoints"] + 1))
    probe("save_image", before=lambda *a, **k: record.__setitem__("grids", record["grids"] + 1))
    probe_dir, argv, runs = sys.argv[1], sys.argv[2:], []
    while "--then" in argv:
        runs.append(argv[:argv.index("--then")])
        argv = argv[argv.index("--then") + 1:]
    for i, run_argv in enumerate(runs + [argv]):
        if i:  # a new process group: on a store of its own (keys of the last group would linger in torchrun's)
            os.environ.update(TORCHELASTIC_USE_AGENT_STORE="False", MASTER_PORT=os.environ[f"DDP_TEST_PORT_{i}"])
            if os.environ["RANK"] == "0":
                print(RUN_MARK, flush=True)
        record.clear()
        record.update({"weights": [], "ema": [], "images": [], "timesteps": [], "checkpoints": 0, "grids": 0})
        ddpm.main(run_argv)
        torch.save(dict(record), os.path.join(probe_dir, f"run{i}_rank{os.environ['RANK']}.pt"))
        if os.environ["RANK"] == "0":  # the checkpoint as this run left it (the next run overwrites it)
            shutil.copy(os.path.join(ddpm.parse_args(run_argv).out_dir, "ckpt.pt"), os.path.join(probe_dir, f"run{i}_ckpt.pt"))
