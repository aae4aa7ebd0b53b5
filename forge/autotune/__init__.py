"""Choose the per-device batch and gradient accumulation that fill memory and keep the global batch.

Plain HF Trainer (after the Trainer is built, before ``train()``)::

    trainer = Trainer(model, args, train_dataset=ds, eval_dataset=dev)
    result = autotune_batch_size(trainer, target_global_batch=64, tune_eval=True)
    print(format_table(result))            # probes, memory model, choice
    trainer.train()                         # runs with the chosen batch and accumulation

Preset: ``autotune: {enabled: true, max_memory: 20GB}`` does it before ``forge train``, and
``forge autotune PRESET --max-memory 20GB --target-global-batch 64`` prints the table
(``forge.autotune_preset``, a recipe in :mod:`forge.recipes.autotune`, does the same in Python).

How it decides (at most five real steps, see ``docs/autotune.md``): peak memory is close to
linear in the batch for a fixed sequence length, so two small probes fit a line, a third
refines it when the extrapolation is long, the batch the run will use is confirmed by one
probe, and a failure backs off once. On CUDA the probes read the allocator's peak and catch
out-of-memory errors; elsewhere (and in tests) they count the bytes a step keeps alive against
an explicit ``max_memory``.
"""

from forge.autotune.config import AutotuneConfig, from_preset
from forge.autotune.data import parse_memory, sequence_length
from forge.autotune.result import AutotuneCallback, AutotuneResult, format_table
from forge.autotune.search import LinearFit, Probe
from forge.autotune.tune import autotune_batch_size

__all__ = ["AutotuneCallback", "AutotuneConfig", "AutotuneResult", "LinearFit", "Probe",
           "autotune_batch_size", "format_table", "from_preset", "parse_memory",
           "sequence_length"]

