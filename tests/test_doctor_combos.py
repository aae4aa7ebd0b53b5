"""The combination table of forge doctor, row by row, against what forge and TRL really do.

For every row of ``forge.doctor.COMBINATIONS``: its example (overrides of the demo preset)
must make the doctor's own check say FAIL (refused) or WARN (unsupported), and the real path
must agree: ``load_preset`` refuses a ``preset`` row, ``build_trainer`` refuses a ``build``
row (with the reason the row gives), and a ``train`` row is refused by the feature's own
check on a real sharded module. A table row the real code stopped refusing, or a refusal
the table lost, fails here.
"""

from __future__ import annotations

import copy
import json

import pytest

import forge
from forge.config.loader import _merge, _nest
from forge.doctor import COMBINATIONS, FAIL, WARN, Setup, check_combinations
from forge.doctor.combos import REFUSED
from forge.errors import ConfigError, ForgeError
from forge.recipes.data import load_examples
from forge.recipes.doctor import model_files, setup_of
from forge.recipes.phases import RunConfig

FAST = {"data.max_samples": 16, "data.max_length": 64, "training.max_steps": 1,
        "training.per_device_train_batch_size": 4}
# What the real refusal says, per row: the table must name the reason the code gives.
REFUSAL = {
    "loss-with-loss-type": "loss_type",
    "loss-with-label-smoothing": "label_smoothing",
    "autotune-sharded": "FSDP and DeepSpeed",
    "autotune-cpu-no-budget": "max_memory",
    "lp-lora-tied-head": "tied",
    "assistant-loss-plain-text": "conversational",
    "padding-free-unpacked": "padding_free",
    "ema-fsdp1": "FSDP1",
}


def _example(combo, tmp_path) -> dict:
    overrides = {**FAST, **combo.example}
    if overrides.get("data.path") == "rows:text":  # plain-text rows, written for the example
        path = tmp_path / "text.jsonl"
        path.write_text("".join(json.dumps({"text": f"line {i} of plain text."}) + "\n" for i in range(16)))
        overrides["data.path"] = str(path)
    return overrides


def _setup(overrides: dict) -> Setup:
    """The doctor's view of a preset with these overrides (a preset refused at load as a plain dict)."""
    try:
        preset = forge.load_preset("demo", overrides)
    except ConfigError:
        config = copy.deepcopy(forge.load_preset("demo").to_dict())
        for key, value in overrides.items():
            _merge(config, _nest(key, value), {}, "--set")
        return Setup(config=config, args=None)
    run = RunConfig.from_preset(preset)
    rows = load_examples(run.data.path, run.method, run.data.format, max_samples=4)
    return setup_of(run, model_files(run)[0], rows)


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: c.key)
def test_the_doctor_flags_each_row_and_the_real_path_does_what_the_row_says(combo, tmp_path, one_thread):
    assert combo.example, f"{combo.key}: a row needs an example to be checked"
    if "training.deepspeed" in combo.example:
        # Without it, transformers refuses the arguments themselves (and leaves global state behind).
        pytest.importorskip("deepspeed", reason="a DeepSpeed config needs deepspeed installed")
    overrides = _example(combo, tmp_path)
    check = check_combinations(_setup(overrides))
    assert combo.key in check.data["matched"]
    assert check.status == (FAIL if combo.verdict == REFUSED else WARN)

    if combo.stage == "preset":
        with pytest.raises(ConfigError):
            forge.load_preset("demo", overrides)
    elif combo.stage == "build":
        from forge.recipes.runner import build_trainer

        preset = forge.load_preset("demo", {**overrides, "training.output_dir": str(tmp_path / "out")})
        if combo.verdict == REFUSED:
            with pytest.raises((ForgeError, ValueError)) as err:
                build_trainer(preset)
            assert REFUSAL[combo.key] in str(err.value)
        else:
            build_trainer(preset)  # accepted: it runs, only not as one might hope
    else:
        _check_at_train_start(combo, overrides, tmp_path)


def _check_at_train_start(combo, overrides, tmp_path):
    """Rows refused once training starts under a sharded launch: the feature's own check on a real one."""
    import torch
    import torch.distributed as dist

    if combo.key == "freeze-schedule-sharded":
        pytest.skip("not refused, only unsupported: what a sharded optimizer makes of a schedule needs a "
                    "multi-GPU launch (docs/distributed.md)")
    assert combo.key == "ema-fsdp1", f"{combo.key}: add how to check it here"
    from torch.distributed.fsdp import FullyShardedDataParallel

    from forge.ema.distributed import check_supported

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(torch.nn.Linear(4, 4), device_id=torch.device("cpu"))
        with pytest.raises(NotImplementedError) as err:
            check_supported(wrapped)
        assert REFUSAL[combo.key] in str(err.value)
    finally:
        dist.destroy_process_group()


def test_a_run_near_a_row_but_outside_it_is_not_flagged(tmp_path):
    # A plain loss section (no strategy) with loss_type dft is accepted by forge: not flagged.
    from forge.recipes.runner import build_trainer

    near = {**FAST, "loss.fused": False, "training.loss_type": "dft"}
    assert check_combinations(_setup(near)).data["matched"] == []
    build_trainer(forge.load_preset("demo", {**near, "training.output_dir": str(tmp_path / "out")}))
    # autotune with a budget on the CPU is fine.
    assert check_combinations(_setup({**FAST, "autotune.enabled": True, "autotune.max_memory": "1GB"})).status \
        != FAIL
