"""FSDP2 (``fully_shard``) in a plain loop with forge's EMA, monitor, histograms and a change of
trainability, beside an unsharded copy trained on the same global batch in the same process
(the reference). Run by `tests/test_distributed.py` under torchrun with 2 CPU processes.

Each rank trains on its half of every global batch; the reference on all of it. At step 2 a
NaN is put into the last row of ``lm_head.weight``'s gradient: on rank 1 (which owns that row)
and in the reference; at step 3 block 0 is frozen (what a schedule does), announced through
the trainable set. Writes ``rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_tiny_llama  # noqa: E402

from forge.core.trainable import trainable_set  # noqa: E402
from forge.ema import EMAWeights  # noqa: E402
from forge.monitor import GradientMonitor  # noqa: E402
from forge.trackers.base import grad_histograms  # noqa: E402

out = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from torch.distributed.fsdp import fully_shard  # noqa: E402

model = make_tiny_llama(0)
reference = copy.deepcopy(model)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
runs = {}
for name, m in (("fsdp", model), ("ref", reference)):
    runs[name] = {"model": m, "opt": torch.optim.AdamW(m.parameters(), lr=1e-2),
                  "ema": EMAWeights(m, decay=0.7), "monitor": GradientMonitor(log_every=1).attach(m),
                  "hists": []}
gen = torch.Generator().manual_seed(3)
for step in range(1, 6):
    batch = torch.randint(0, 128, (4, 16), generator=gen)
    if step == 3:  # a schedule freezes block 0 and announces it
        for m in (model, reference):
            for p in m.model.layers[0].parameters():
                p.requires_grad_(False)
            trainable_set(m).refresh(step)
    for name, run in runs.items():
        m = run["model"]
        rows = batch[rank * 2:(rank + 1) * 2] if name == "fsdp" else batch
        loss = m(input_ids=rows, labels=rows).loss
        loss.backward()
        if step == 2:
            grad = m.lm_head.weight.grad
            if name == "ref":
                grad[-1, 0] = float("nan")
            elif rank == world - 1:
                grad.to_local()[-1, 0] = float("nan")
        if step % 2 == 0:
            run["hists"].append({k: {"num": v["num"], "sum": v["sum"], "min": v["min"], "max": v["max"]}
                                 for k, v in grad_histograms(m).items()})
        applied = run["monitor"].step(run["opt"], loss=loss.detach())
        run["monitor"].flush_metrics()  # one history entry per step
        run["opt"].zero_grad()
        if applied:
            run["ema"].update(m, step=step)
report = {}
for name, run in runs.items():
    m, ema = run["model"], run["ema"]
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in m.named_parameters()}
    report[name] = {"skipped": run["monitor"].skipped_steps, "history": run["monitor"].history, "hists": run["hists"], "ema_distance": ema.figures(m)}
    report[name]["weights"] = {n: t.double().sum().item() for n, t in full.items()}
    report[name]["ema"] = {n: t.double().sum().item() for n, t in ema.full_state_dict().items()}
    torch.save({"weights": full, "ema": ema.full_state_dict()}, os.path.join(out, f"{name}{rank}.pt"))
with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
    json.dump({k: {kk: vv for kk, vv in v.items() if kk not in ("weights", "ema")} for k, v in report.items()}, fh)
dist.barrier()
dist.destroy_process_group()
