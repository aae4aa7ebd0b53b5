"""``forge merge``: fold a run's LoRA/DoRA adapter into its base and save a plain model.

PEFT's ``merge_and_unload`` does the merge. The base is loaded in float32 for it (the merged
weight ``W + scale * B @ A`` is formed at full precision) and cast to the dtype asked for at the
end. For a QLoRA run, merging into the 4-bit base would round every merged weight back to
4 bits; forge loads the base unquantized instead (the original weights, the usual export), or,
with ``dequantize=True``, loads the 4-bit base as it trained and dequantizes it first (exactly
the weights the adapter was trained against). Either way it says which, in one line.

The output directory holds ``model.safetensors``, ``config.json``, the generation config and
the run's tokenizer with its chat template: any transformers, vLLM or llama.cpp tool loads it
without PEFT.

Example:
    >>> merge_run("outputs/lora", "outputs/lora-merged", dtype="bfloat16")
    'outputs/lora-merged'
"""

from __future__ import annotations

from pathlib import Path

from forge.config.schema import DTYPES
from forge.core.console import note
from forge.errors import ForgeError
from forge.recipes.output import check_output_dir
from forge.workflow.run import load_plain, load_run_tokenizer, read_run


def merge_run(run_dir: str, out: str | None = None, dtype: str | None = None,
              dequantize: bool = False, overwrite: bool = False) -> str:
    """Merge the adapter in ``run_dir`` into its base; save the plain model to ``out``.

    Args:
        run_dir: a ``forge train`` output directory holding an adapter.
        out: where to save (default ``RUN_DIR/merged``); refused when not empty, unless
            ``overwrite``.
        dtype: dtype of the saved weights (``bfloat16``, ``float16``, ``float32``); None: the
            base checkpoint's own dtype.
        dequantize: for a QLoRA run, merge into the dequantized 4-bit base instead of the
            original unquantized one.
        overwrite: write into a non-empty ``out``.

    Returns:
        The output directory.

    Raises:
        ForgeError: no adapter in ``run_dir``, a bad dtype, or a non-empty ``out``.
    """
    from peft import PeftModel

    if dtype is not None and dtype not in DTYPES:
        raise ForgeError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    run = read_run(run_dir)
    if run.adapter_base is None:
        raise ForgeError(f"{run_dir}: holds a full model, not an adapter; there is nothing to merge")
    target = Path(out) if out else run.path / "merged"
    check_output_dir(str(target), overwrite, resume=False)
    tokenizer = load_run_tokenizer(run)  # cheap, and a broken tokenizer should stop us early

    base = _load_base(run, dequantize)
    wanted = _target_dtype(dtype, base)
    merged = PeftModel.from_pretrained(base, str(run.path)).merge_and_unload()
    merged = merged.to(wanted)
    merged.config.dtype = wanted
    target.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(target))  # safetensors
    tokenizer.save_pretrained(str(target))  # with the chat template
    name = str(wanted).removeprefix("torch.")
    note(f"merged the adapter of {run_dir} into {run.adapter_base} and saved a plain {name} model "
         f"with its tokenizer and chat template to {target}")
    return str(target)


def _load_base(run, dequantize: bool):
    """The base in float32: unquantized, or (QLoRA with ``dequantize``) 4-bit then dequantized."""
    if run.quantization and dequantize:
        note("QLoRA run: the 4-bit base was loaded as it trained and dequantized to float32 before "
             "merging (the exact weights the adapter trained against)")
        return load_plain(run, run.adapter_base, True, "float32").dequantize()
    if run.quantization:
        note("QLoRA run: the base was loaded unquantized in float32 for the merge, not in 4-bit "
             "(merging into 4-bit weights would round them; --dequantize merges into the "
             "dequantized 4-bit weights instead)")
    elif dequantize:
        raise ForgeError(f"--dequantize: the run in {run.path} did not train on a quantized base")
    return load_plain(run, run.adapter_base, False, "float32")


def _target_dtype(dtype: str | None, base):
    """The dtype to save in: the one asked for, else the base checkpoint's own (float32 if unknown)."""
    import torch

    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    from transformers import AutoConfig

    from forge.recipes.model import resolve_model_path

    try:
        saved = AutoConfig.from_pretrained(resolve_model_path(base.name_or_path)).dtype
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32
