"""ddpm.py under torchrun, with probes: `torchrun ... tests/ddp_worker.py PROBE_DIR <ddpm.py flags>`.

Each rank runs ddpm.main() unchanged, except that a few of its functions are wrapped to record,
per optimizer step, this rank's weights and EMA, the digits it trained on and the timesteps it
drew, and how often it wrote a checkpoint or a grid. The records go to PROBE_DIR/rank<R>.pt for
tests/test_ddp.py to compare across ranks. Not a test module itself (no test_ prefix).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402

record = {"weights": [], "ema": [], "images": [], "timesteps": [], "checkpoints": 0, "grids": 0}


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


probe("ema_update", after=after_ema)
probe("to_model_range", before=lambda images: record["images"].append(images.clone()))  # training batches first
probe("diffusion_loss", after=lambda out, *a, **k: record["timesteps"].append(out[1].clone()))
probe("save_checkpoint", before=lambda *a, **k: record.__setitem__("checkpoints", record["checkpoints"] + 1))
probe("save_image", before=lambda *a, **k: record.__setitem__("grids", record["grids"] + 1))

if __name__ == "__main__":
    probe_dir, argv = sys.argv[1], sys.argv[2:]
    ddpm.main(argv)
    torch.save(record, os.path.join(probe_dir, f"rank{os.environ['RANK']}.pt"))
