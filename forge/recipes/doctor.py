"""``forge doctor PRESET`` and the pre-flight of ``forge train``: the checks of :mod:`forge.doctor`
on what a preset loads (its tokenizer, a sample of its data, its model config; no training).

* :func:`preflight` is what ``forge train`` runs first: the checks that need no model
  weights. WARN lines are printed, any FAIL stops the run as a :class:`ForgeError`.
* :func:`doctor_preset` adds the memory check (it loads the model as ``forge train`` would
  and measures one step) and, with ``resume=True``, the resume check
  (:mod:`forge.recipes.doctor_resume`).

Example:
    >>> checks = doctor_preset(forge.load_preset("demo"), max_memory="2GB")
    >>> print(format_checks(checks))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forge.config.loader import Preset
from forge.core.console import note
from forge.doctor import FAIL, OK, WARN, Check, Setup, check_combinations, data_checks, failures
from forge.doctor.result import format_line, summary
from forge.errors import ForgeError
from forge.recipes.data import load_examples
from forge.recipes.mixing import sample_rows
from forge.recipes.model import adapter_base, load_tokenizer, model_max_positions, resolve_model_path
from forge.recipes.phases import RunConfig

SAMPLE_ROWS = 512  # rows of the data (and of the eval data) the checks tokenise


@dataclass
class Loaded:
    """What the checks loaded, kept for the checks that need the model."""

    tokenizer: Any
    rows: Any
    max_length: int | None


def model_files(config: RunConfig) -> tuple[Any, Any]:
    """The model's config and generation config, read without the weights (None where unreadable)."""
    from transformers import AutoConfig, GenerationConfig

    model = config.model
    path = resolve_model_path(adapter_base(model.name_or_path) or model.name_or_path)
    kwargs = {"revision": model.revision, "trust_remote_code": model.trust_remote_code}
    try:
        model_config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        return None, None
    if model.attn_implementation:
        model_config._attn_implementation = model.attn_implementation
    try:
        generation = GenerationConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError):
        generation = None
    return model_config, generation


def _sample(config: RunConfig, sample: int) -> tuple[Any, Any]:
    data = config.data
    cap = min(sample, data.max_samples) if data.max_samples else sample
    rows = sample_rows(data, config.method, cap)  # every source of data.sources, named on an error
    eval_rows = None
    if data.eval_path or (data.eval_split and data.path):
        eval_rows = load_examples(data.eval_path or data.path, config.method, data.format,
                                  data.eval_split or data.split, sample, columns=data.columns)
    return rows, eval_rows


def _accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or bool(getattr(torch.backends, "mps", None)
                                             and torch.backends.mps.is_available())


def setup_of(config: RunConfig, model_config: Any, rows: Any) -> Setup:
    """What the combination table looks at, for a resolved run and its rows."""
    import yaml

    fmt = "text" if "text" in rows.column_names else config.data.format
    return Setup(config=yaml.safe_load(config.preset_yaml), args=config.training_args, model_config=model_config,
                 data_format=fmt, accelerator=_accelerator())


def fast_checks(config: RunConfig, sample: int = SAMPLE_ROWS) -> tuple[list[Check], Loaded]:
    """The checks that need no model weights: combination, rows, loss mask, EOS, truncation, packing.

    Raises:
        ForgeError: the data or tokenizer cannot load (as ``forge train`` would report it).
    """
    args = config.training_args
    # The data first, as `forge train` reads it: a missing file is named before any model file is looked up.
    rows, eval_rows = _sample(config, sample)
    model_config, generation = model_files(config)
    checks = [check_combinations(setup_of(config, model_config, rows))]
    tokenizer = load_tokenizer(config.model)
    limit = model_max_positions(config.model)
    max_length = min(args.max_length, limit) if args.max_length and limit else args.max_length
    checks += data_checks(rows, tokenizer, args, config.method, eval_dataset=eval_rows, model_config=model_config,
                          generation_eos=getattr(generation, "eos_token_id", None), max_length=max_length)
    return checks, Loaded(tokenizer, rows, max_length)


def preflight(config: RunConfig) -> list[Check]:
    """The fast checks at the start of ``forge train``: WARNs are printed, a FAIL stops the run.

    Returns:
        The checks, to be written into the run directory once the run starts.

    Raises:
        ForgeError: one line per FAIL (``--no-doctor`` skips the checks).
    """
    try:
        checks, _ = fast_checks(config)
    except ForgeError:
        raise
    except Exception as err:  # a check that cannot run must not stop a run it could not judge
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        checks = [Check("doctor", WARN, f"the pre-flight checks could not run ({type(err).__name__}: {first})")]
    for check in checks:
        if check.status == WARN:
            note(f"doctor: {format_line(check)}")
    failed = failures(checks)
    if failed:
        raise ForgeError("\n".join(f"doctor: {format_line(c)}" for c in failed)
                         + "\ndoctor: fix the above, or pass --no-doctor to train anyway")
    note(f"doctor: {summary(checks)} (forge doctor shows every check; --no-doctor skips them)")
    return checks


def memory_check(config: RunConfig, loaded: Loaded, max_memory: str | None) -> Check:
    """Load the model as ``forge train`` does (transforms included) and measure one step."""
    from forge.autotune.config import place_for_training
    from forge.autotune.data import is_preference, sequence_length
    from forge.autotune.probe import storage_bytes
    from forge.doctor import check_memory
    from forge.recipes.model import load_model
    from forge.recipes.phases import Run

    if "autotune" in config.features:
        return Check("memory", OK, "autotune: enabled chooses the batch that fits when the run starts "
                     "(`forge autotune` shows its choice)")
    args = config.training_args
    try:
        model = load_model(config.model, config.quantization, config.peft)
        run = Run(config, model, loaded.tokenizer, loaded.rows, None)
        run.transform_model()
        run.plan_memory()
        place_for_training(model, args)
    except ForgeError as err:
        return Check("memory", WARN, f"not estimated: {str(err).splitlines()[0]}")
    reserved = sum(run.reserved.values())
    if is_preference(loaded.rows) and config.peft is None:
        reserved += storage_bytes(model.parameters())  # DPO's frozen reference copy
    seq_len = sequence_length(loaded.rows, loaded.tokenizer, max_length=loaded.max_length,
                              packing=bool(getattr(args, "packing", False)))
    return check_memory(model, args, seq_len, max_memory, reserved,
                        rows_per_example=2 if is_preference(loaded.rows) else 1)


def doctor_preset(preset: Preset, max_memory: str | None = None, resume: bool = False,
                  sample: int = SAMPLE_ROWS, memory: bool = True) -> list[Check]:
    """Every check on a preset: the fast ones, memory (loads the model) and, optionally, resume.

    Args:
        preset: from :func:`forge.load_preset`.
        max_memory: memory budget per device (default: the GPU's free memory, or the RAM).
        resume: also train two steps, save, resume and compare (slow).
        sample: data rows to tokenise.
        memory: run the memory check (it loads the model).

    Returns:
        The checks, in the order printed.
    """
    config = RunConfig.from_preset(preset)
    checks, loaded = fast_checks(config, sample)
    if memory and not any(c.status == FAIL and c.name == "combination" for c in checks):
        checks.append(memory_check(config, loaded, max_memory))
    if resume:
        from forge.recipes.doctor_resume import check_resume

        checks.append(check_resume(preset))
    return checks
