"""forge's one memory model (``forge.core.memory.StepMemory``, used by autotune and
``suggest_freeze``) against the peak RSS growth of a fresh process running the same training.

Run (CPU, a few minutes on 2 shared cores)::

    python benchmarks/bench_memory.py

Two tables: the step memory of a Llama with a large vocabulary over a small hidden size (the
issue's case: vocabulary 8192, hidden 64, where the logits' backward transients are half the
peak), plain, under gradient accumulation and with a block frozen; and ``suggest_freeze``'s
plans on two Llamas. The oracle (``tests/_memory_oracle.py``) trains two AdamW steps in a new
interpreter per row (the second at steady state), its baseline taken after a warm-up of the same
class, the kernel's high-water mark reset through ``/proc/self/clear_refs``, with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the resident set. Linux only.

Each row is measured twice: as a run would be (MKL's own memory manager on, which keeps a
buffer about the size of the largest weight matrix it multiplied, outside torch's allocator,
so no tensor count can see it), and with ``MKL_DISABLE_FAST_MM=1``, which leaves the tensors.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from forge.core.memory import StepMemory  # noqa: E402
from forge.layers import freeze_layers  # noqa: E402
from forge.layers.suggest import suggest_freeze  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _memory_oracle import rss_growth  # noqa: E402

MIB = 2**20
ISSUE = {"vocab_size": 8192, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
SUGGEST = [
    ({"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 2}, 4, 128, [0, 2, 4]),
    ({"vocab_size": 8192, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
      "num_attention_heads": 6, "num_key_value_heads": 2}, 2, 256, [0, 3, 6]),
]


def _model(config: dict, freeze: list[int] = ()) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    if freeze:
        freeze_layers(model, indices=list(freeze), embeddings=True)
    return model


def _batch(config: dict, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_rows(batch: int = 8, seq: int = 128) -> list[str]:
    cases = {"plain": {}, "accumulation 2": {"accumulation": 2}, "block 0 + embeddings frozen": {"freeze": [0]}}
    specs = [{"config": ISSUE, "batch": batch, "seq": seq, "max_grad_norm": 1.0, **c} for c in cases.values()]
    measured, no_mkl_mm = rss_growth(specs), rss_growth(specs, env=NO_MKL_MM)
    rows = [HEAD.replace("| model | blocks | batch | frozen ", "| case "), "|---|---:|---:|---:|---:|---:|"]
    for (name, case), oracle, bare in zip(cases.items(), measured, no_mkl_mm):
        memory = StepMemory(_model(ISSUE, case.get("freeze", [])), accumulation_steps=case.get("accumulation", 1),
                            max_grad_norm=1.0)
        estimate = memory.measure(_batch(ISSUE, batch, seq)).peak_bytes
        rows.append(f"| {name} | {_cells(estimate, oracle, bare)} |")
    return rows


NO_MKL_MM = {"MKL_DISABLE_FAST_MM": "1"}
HEAD = ("| model | blocks | batch | frozen | estimate MiB | fresh process MiB | error "
        "| with MKL_DISABLE_FAST_MM=1 MiB | error |")


def _cells(estimate: int, oracle: int, bare: int) -> str:
    return (f"{estimate / MIB:.1f} | {oracle / MIB:.1f} | {100 * (estimate - oracle) / oracle:+.1f}% | "
            f"{bare / MIB:.1f} | {100 * (estimate - bare) / bare:+.1f}%")


def suggest_rows() -> list[str]:
    rows = [HEAD, "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for config, batch, seq, frozen in SUGGEST:
        plans = suggest_freeze(_model(config), _batch(config, batch, seq)).plans
        specs = [{"config": config, "batch": batch, "seq": seq, "freeze": list(range(k))} for k in frozen]
        for k, oracle, bare in zip(frozen, rss_growth(specs), rss_growth(specs, env=NO_MKL_MM)):
            rows.append(f"| Llama h{config['hidden_size']} v{config['vocab_size']} | {config['num_hidden_layers']} | "
                        f"{batch}x{seq} | {k} | {_cells(plans[k].peak_bytes, oracle, bare)} |")
    return rows


def main() -> None:
    torch.set_num_threads(1)
    print(f"# bench_memory: torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread")
    print("\n".join(step_rows()))
    print()
    print("\n".join(suggest_rows()))


if __name__ == "__main__":
    main()
