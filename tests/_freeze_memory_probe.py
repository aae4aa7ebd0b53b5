"""Measure the peak resident-memory growth of a short CPU training run in a fresh process.

Run as ``python _freeze_memory_probe.py '<json>'`` with keys ``config`` (LlamaConfig kwargs),
``batch``, ``seq``, ``freeze`` (block indices; the embeddings are frozen too when non-empty)
and ``steps``. Prints one JSON line: ``growth`` (bytes) and ``weights`` (bytes).

How the measurement stays honest on a small shared box:

* one intra-op thread, so no thread pool grows mid-run;
* a warm-up step on a one-block model of the same class first, so lazy imports, kernel
  selection and autograd-engine start-up are not billed to the model;
* the baseline is the resident set after that warm-up; the kernel's high-water mark is then
  reset (``/proc/self/clear_refs``) so the peak covers building the model and training only;
* the parent sets ``MALLOC_MMAP_THRESHOLD_`` so tensor buffers are mmapped and returned to the
  OS on free: the resident set then follows live tensors instead of glibc's free lists.
"""

from __future__ import annotations

import gc
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge.layers import freeze_layers

    def run(config: dict, batch: int, seq: int, freeze: list[int], steps: int) -> LlamaForCausalLM:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config))
        if freeze:
            freeze_layers(model, indices=freeze, embeddings=True)
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(steps):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model

    warm = dict(spec["config"], num_hidden_layers=1)
    del_me = run(warm, 1, 8, [], 2)
    del del_me
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    model = run(spec["config"], spec["batch"], spec["seq"], spec["freeze"], spec["steps"])
    peak = _status("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak - base, "weights": weights}))


if __name__ == "__main__":
    main()
