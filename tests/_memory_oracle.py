"""The independent memory oracle: peak resident-memory growth of a short CPU training run in a
fresh process. Forge's memory model (``forge.core.memory.StepMemory``), autotune and
``suggest_freeze`` are judged against it, never against themselves.

Run as ``python _memory_oracle.py '<json>'``, or call :func:`rss_growth` with a list of specs
(run side by side, one fresh interpreter each). A spec names the model one of two ways:

* ``config``: LlamaConfig kwargs, with ``freeze`` (block indices; the embeddings are frozen too
  when non-empty);
* ``preset`` and ``overrides``: a forge preset; the model is built from the preset model's
  config (same class, size and dtype as the loaded weights) and transformed as ``forge train``
  transforms it (phase 1: freezing, the loss patch), and ``ema: true`` holds forge's EMA
  shadow (``EMAWeights``) and updates it after every step, as the EMA callback does. The
  optimizer and gradient clipping are the Trainer's for the preset's arguments.

and ``batch``, ``seq``, ``steps`` (optimizer steps, default 2: the second is at steady state), ``accumulation`` (micro-batches per step),
``max_grad_norm``; with ``eval_batch``, two evaluation forwards (``no_grad``) at that batch follow
the training steps, the optimizer state still allocated as when the Trainer evaluates mid-run,
and their own peak is reported too. Prints one JSON line: ``growth`` (bytes, the training
peak), ``eval_growth`` (with ``eval_batch``) and ``weights`` (bytes).

How the measurement stays honest on a small shared box:

* one intra-op thread, so no thread pool grows mid-run;
* a warm-up run on a smaller model of the same class first (same path: transform, EMA,
  optimizer), so lazy imports, kernel selection and autograd-engine start-up are not billed;
* the baseline is the resident set after that warm-up; the kernel's high-water mark is then
  reset (``/proc/self/clear_refs``) so the peak covers building the model and training only;
* ``MALLOC_MMAP_THRESHOLD_`` is set so tensor buffers are mmapped and returned to the OS on
  free: the resident set then follows live tensors instead of glibc's free lists.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def available() -> bool:
    """Whether the kernel lets a process reset its peak RSS (Linux /proc)."""
    return os.path.exists("/proc/self/clear_refs")


def rss_growth(specs: list[dict[str, Any]], timeout: float = 600, key: str | None = "growth",
               env: dict[str, str] | None = None) -> list[Any]:
    """Peak RSS growth (bytes) of each spec's run, each in its own new interpreter, side by side
    (``key="eval_growth"``: of its evaluation; ``key=None``: the whole JSON line; ``env``: extra
    environment, e.g. ``MKL_DISABLE_FAST_MM=1``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for spec in specs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, stderr[-3000:]
        line = json.loads(stdout.strip().splitlines()[-1])
        out.append(line if key is None else line[key])
    return out


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _config_model(spec: dict[str, Any], layers: int | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge.layers import freeze_layers

    config = dict(spec["config"], **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    freeze = [i for i in spec.get("freeze", []) if i < config["num_hidden_layers"]]
    if freeze:
        freeze_layers(model, indices=freeze, embeddings=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, None, config["vocab_size"]


def _preset_model(spec: dict[str, Any], layers: int | None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer

    import forge
    from forge.ema.core import EMAWeights
    from forge.recipes.model import resolve_model_path
    from forge.recipes.phases import Run, RunConfig

    run_config = RunConfig.from_preset(forge.load_preset(spec["preset"], spec.get("overrides") or {}))
    hf_config = AutoConfig.from_pretrained(resolve_model_path(run_config.model.name_or_path))
    if layers:
        hf_config.num_hidden_layers = layers
    dtype = getattr(torch, run_config.model.dtype or "float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    run = Run(run_config, model, None, None, None)
    run.transform_model()
    args = run_config.training_args
    if args.activation_checkpointing:  # as the Trainer switches it on before training
        kwargs = dict(args.activation_checkpointing_kwargs or {})
        every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                              every_n_layers=every, offload=offload)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    ema = EMAWeights(model) if spec.get("ema") else None
    return model, optimizer, ema, hf_config.vocab_size


def _train(spec: dict[str, Any], batch: int, seq: int, steps: int, layers: int | None = None):
    import torch

    build = _preset_model if "preset" in spec else _config_model
    model, optimizer, ema, vocab = build(spec, layers)
    model.train()
    accumulation = int(spec.get("accumulation", 1))
    clip = spec.get("max_grad_norm")
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        for _ in range(accumulation):
            (model(**inputs).loss / accumulation).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, step + 1)
    return model, optimizer, inputs


def _evaluate(model, batch: int, seq: int) -> None:
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    warm = _train(spec, 1, 8, 2, layers=2)
    if "eval_batch" in spec:
        _evaluate(warm[0], 1, 8)
    del warm
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    model, optimizer, inputs = _train(spec, spec["batch"], spec["seq"], spec.get("steps", 2))
    out = {"growth": _status("VmHWM") - base,
           "weights": sum(p.numel() * p.element_size() for p in model.parameters())}
    if "eval_batch" in spec:
        del inputs
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak of the evaluation alone, the optimizer state still held
        _evaluate(model, spec["eval_batch"], spec["seq"])
        out["eval_growth"] = _status("VmHWM") - base
    print(json.dumps(out))


if __name__ == "__main__":
    main()
