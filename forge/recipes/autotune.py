"""``forge autotune PRESET``: load what ``forge train`` would and tune its batch, without training."""

from __future__ import annotations

from typing import Any

from forge.autotune.config import AutotuneConfig, is_evaluating, place_for_training, tune_for_preset
from forge.autotune.result import AutotuneResult
from forge.errors import ForgeError


def autotune_preset(preset: Any, max_memory: str | None = None,
                    target_global_batch: int | None = None) -> AutotuneResult:
    """Load a preset's model, tokenizer and data as ``forge train`` does, and tune its batch.

    The preset's ``autotune:`` section (if any) supplies the settings and the arguments
    override it. Nothing is trained and the preset is not changed.

    Args:
        preset: from :func:`forge.load_preset`.
        max_memory: per-device budget such as ``"20GB"`` (required without a GPU).
        target_global_batch: examples per optimizer step; default the preset's.

    Returns:
        An :class:`AutotuneResult`; print it with :func:`format_table`.

    Raises:
        ForgeError: as :func:`autotune_batch_size`, or the preset's model/data cannot load.

    Example:
        >>> result = autotune_preset(forge.load_preset("demo"), max_memory="200MB")
        >>> print(format_table(result))
    """
    from forge.recipes.model import load_model, load_tokenizer
    from forge.recipes.phases import Run, RunConfig
    from forge.recipes.runner import load_datasets

    section = preset.config.get("autotune")
    section = {"enabled": section} if isinstance(section, bool) else dict(section or {})
    if max_memory is not None:
        section["max_memory"] = max_memory
    if target_global_batch is not None:
        section["target_global_batch"] = target_global_batch
    try:
        cfg = AutotuneConfig(**section)
    except ValueError as err:
        raise ForgeError(str(err)) from None
    config = RunConfig.from_preset(preset)
    config.features.pop("autotune", None)
    args = config.training_args
    train_ds, eval_ds = load_datasets(config)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, config.quantization, config.peft)
    # The model as `forge train` would train it: frozen blocks, the fused loss, and the memory
    # the EMA and the monitor hold beside each step.
    run = Run(config, model, tokenizer, train_ds, eval_ds)
    run.transform_model()
    run.plan_memory()
    place_for_training(model, args)
    evaluating = eval_ds is not None or is_evaluating(args)
    return tune_for_preset(cfg, model, args, train_ds, tokenizer, evaluating, apply=False,
                           reserved_bytes=sum(run.reserved.values()))
