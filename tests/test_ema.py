"""Tests for forge.ema: numerics against torch's AveragedModel and direct formulas, the Trainer
callback (resume, eval, save), PEFT/QLoRA, two-process DDP and FSDP2, and the shipped example."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from forge.ema import EMA_WEIGHTS_NAME, EMACallback, EMAConfig, EMAWeights, from_preset
from forge.ema.schedule import initial_weight_share, run_length_advice

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and the CI box's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers --------------------------------------------------------------------------------
def _mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.Tanh(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _train_steps(model: nn.Module, steps: int, callback, lr: float = 0.1, seed: int = 1) -> None:
    """SGD on random data, ``callback()`` after every optimizer step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        callback()


def _lm_data(n: int, seed: int, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, seq), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _args(out: Path, **overrides):
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _trainer(model, out: Path, callbacks, eval_data=None, **overrides):
    from transformers import Trainer

    return Trainer(
        model=model,
        args=_args(out, **overrides),
        train_dataset=_lm_data(32, seed=1),
        eval_dataset=eval_data,
        callbacks=callbacks,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- numerics -------------------------------------------------------------------------------
def test_matches_torch_averaged_model():
    model = _mlp(bn=True)
    ema = EMAWeights(model, decay=0.9, include_buffers=True)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ref.update_parameters(model)  # AveragedModel's first call copies; EMAWeights copies at construction

    def both():
        ema.update(model)
        ref.update_parameters(model)

    _train_steps(model, 25, both)
    ref_state = dict(ref.module.named_parameters()) | dict(ref.module.named_buffers())
    assert ema.num_updates == 25
    for name, t in ema.shadow.items():
        if t.is_floating_point():
            # Same maths, one fused lerp each: equal up to float32 rounding (1 ulp).
            torch.testing.assert_close(t, ref_state[name], rtol=1.2e-7, atol=1e-9, msg=name)
        else:  # BatchNorm's integer counter is copied, not averaged
            assert torch.equal(t, dict(model.named_buffers())[name])
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)  # the average lags the weights


def test_tracks_only_trainable_unless_asked():
    model = _mlp()
    model[0].requires_grad_(False)
    assert sorted(EMAWeights(model).shadow) == ["3.bias", "3.weight"]
    assert sorted(EMAWeights(model, include_frozen=True).shadow) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        EMAWeights(model)


def test_ddp_wrapper_names_are_looked_through():
    model = _mlp()

    class DistributedDataParallel(nn.Module):  # stand-in: the real one needs a process group
        def __init__(self, module):
            super().__init__()
            self.module = module

    ema = EMAWeights(DistributedDataParallel(model), decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)  # the plain model works with an EMA made from the wrapper
    torch.testing.assert_close(ema.shadow["0.weight"], model[0].weight - 1.0)


def test_warmup_schedules_follow_their_formulas():
    hyper = EMAWeights(_mlp(), decay=0.99, warmup="hyperbolic", update_after_step=3)
    power = EMAWeights(_mlp(), decay=0.999, warmup="power", inv_gamma=2.0, power=0.75, min_decay=0.1)
    for step in range(1, 60):
        u = step - 3 - 1
        expected = 0.0 if u < 0 else min(0.99, (1 + u) / (10 + u))
        assert hyper.get_decay(step) == pytest.approx(expected, abs=1e-15)
        u = step - 1
        raw = 1 - (1 + u / 2.0) ** -0.75
        assert power.get_decay(step) == pytest.approx(0.0 if u == 0 else min(0.999, max(0.1, raw)), abs=1e-15)
    assert EMAWeights(_mlp(), 0.9, update_every=4).get_decay(8) == pytest.approx(0.9**4)


def test_update_after_step_copies_then_averages():
    model = _mlp()
    ema = EMAWeights(model, decay=0.9, update_after_step=3)
    seen = []

    def record():
        ema.update(model)
        seen.append(torch.equal(ema.shadow["0.weight"], model[0].weight))

    _train_steps(model, 5, record)
    assert seen == [True, True, True, False, False]
    assert ema.num_updates == 2


def test_update_every_tracks_every_step_average_within_bound():
    """With per-step weight change at most ``delta`` per coordinate, averaging every ``k`` steps
    with ``decay**k`` stays within ``(k - 1) * delta * (1 - decay**n)`` of the every-step EMA
    (each block of ``k`` steps gets the same total weight in both; within a block a weight is at
    most ``k - 1`` steps from the sampled one)."""
    decay, n = 0.95, 120
    gen = torch.Generator().manual_seed(0)
    for k in (2, 5):
        model = nn.Linear(16, 16)
        every, sparse = EMAWeights(model, decay), EMAWeights(model, decay, update_every=k)
        naive = EMAWeights(model, decay ** (1 / k), update_every=k)  # decay**k per update, uncompensated
        delta = 0.0
        for _ in range(n):
            with torch.no_grad():
                before = model.weight.clone()
                model.weight.add_(0.01 + 0.01 * torch.rand(16, 16, generator=gen))  # drift + noise
                model.bias.add_(0.01)
                delta = max(delta, (model.weight - before).abs().max().item())
            for e in (every, sparse, naive):
                e.update(model)
        bound = (k - 1) * delta * (1 - decay**n) + 1e-5
        gap = (sparse.shadow["weight"] - every.shadow["weight"]).abs().max().item()
        assert gap <= bound, (k, gap, bound)
        assert gap >= 0.2 * (k - 1) * 0.01  # a steady drift really does open a gap
        naive_gap = (naive.shadow["weight"] - every.shadow["weight"]).abs().max().item()
        assert naive_gap > 3 * bound  # without compensation the average means something else


def test_update_every_is_exact_when_weights_change_once_per_block():
    decay, k = 0.9, 4
    model = nn.Linear(4, 4)
    every, sparse = EMAWeights(model, decay), EMAWeights(model, decay, update_every=k)
    for step in range(1, 41):
        if step % k == 1:
            with torch.no_grad():
                model.weight.mul_(0.9).add_(0.3)
        every.update(model)
        sparse.update(model)
    torch.testing.assert_close(sparse.shadow["weight"], every.shadow["weight"], rtol=1e-6, atol=1e-7)


def test_apply_to_swaps_and_restores_bit_exactly():
    model = _mlp().to(torch.bfloat16)
    ema = EMAWeights(model, decay=0.9)
    assert ema.shadow["0.weight"].dtype == torch.float32  # float32 EMA of a bf16 model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.apply_to(model) as swapped:
        assert swapped is model
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n].to(torch.bfloat16))
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n])
    with pytest.raises(RuntimeError), ema.apply_to(model):
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, raw[n]) for n, p in model.named_parameters())


def test_bf16_ema_would_stall_where_float32_moves():
    """Why the default is float32: a bf16 EMA at decay 0.999 cannot represent its own step."""
    model = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema32, ema16 = EMAWeights(model, 0.999), EMAWeights(model, 0.999, dtype="bfloat16")
    with torch.no_grad():
        model.weight.fill_(1.25)
    for _ in range(200):
        ema32.update(model)
        ema16.update(model)
    expected = 1.25 - 0.25 * 0.999**200
    assert ema32.shadow["weight"][0, 0].item() == pytest.approx(expected, rel=1e-5)
    assert ema16.shadow["weight"][0, 0].item() == 1.0  # every step rounded away


def test_state_dict_and_file_round_trip(tmp_path):
    model = _mlp()
    ema = EMAWeights(model, decay=0.8, update_every=2)
    _train_steps(model, 5, lambda: ema.update(model))
    other = EMAWeights(_mlp(seed=3), decay=0.8, update_every=2)
    other.load(ema.save(tmp_path / EMA_WEIGHTS_NAME))
    assert (other.step, other.num_updates) == (5, 2)
    for name, t in ema.shadow.items():
        assert torch.equal(other.shadow[name], t)
    third = EMAWeights(_mlp(seed=4), decay=0.8, update_every=2)
    third.load_state_dict(ema.state_dict())
    assert all(torch.equal(third.shadow[n], t) for n, t in ema.shadow.items())
    with pytest.raises(KeyError, match="missing"):
        EMAWeights(nn.Linear(2, 2)).load_state_dict(ema.state_dict())
    target = _mlp(seed=5)
    ema.copy_to(target)
    assert all(torch.equal(p, ema.shadow[n]) for n, p in target.named_parameters())


def test_run_length_advice():
    share = initial_weight_share(300, decay=0.999)
    assert share == pytest.approx(0.999**300)
    text = run_length_advice(300, 5 * 10**7, decay=0.999)
    assert text is not None and "74.1%" in text and "eval_ema_loss" in text
    assert "eval_ema_loss" not in run_length_advice(300, 7 * 10**9, decay=0.999)
    assert run_length_advice(100_000, 5 * 10**7, decay=0.999) is None
    assert run_length_advice(300, 5 * 10**7, decay=0.999, warmup="power") is None  # power warm-up starts as a copy


def test_config_and_builder():
    assert from_preset(EMAConfig(), None, None) == {}
    cfg = EMAConfig(enabled=True, decay=0.99, update_every=2, device="cpu", eval_with_ema=True)
    kwargs = from_preset(cfg, _mlp(), _args(Path("unused"), eval_strategy="steps", eval_steps=5))
    (callback,) = kwargs["callbacks"]
    assert isinstance(callback, EMACallback) and callback.eval_with_ema
    assert callback._ema_kwargs["decay"] == 0.99 and callback._ema_kwargs["update_every"] == 2
    with pytest.raises(ValueError) as err:
        EMAConfig(decay=1.5, update_every=0, warmup="linear", dtype="int8")
    for needle in ("decay", "update_every", "did you mean 'hyperbolic'", "dtype"):  # all at once
        assert needle in str(err.value)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        from_preset(EMAConfig(enabled=True), frozen, None)


# -- Trainer --------------------------------------------------------------------------------
class _StopAt:
    """A callback that ends training after ``step`` (after that step's checkpoint)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    control.should_training_stop = True

        return Stop()


def test_trainer_resume_is_bit_identical(tmp_path):
    full_cb = EMACallback(decay=0.8)
    full = _trainer(make_tiny_llama(0), tmp_path / "full", [full_cb])
    full.train()

    out = tmp_path / "interrupted"
    first = _trainer(make_tiny_llama(0), out, [EMACallback(decay=0.8), _StopAt(3)], save_strategy="steps", save_steps=3)
    first.train()
    assert first.state.global_step == 3 and (out / "checkpoint-3" / EMA_WEIGHTS_NAME).is_file()

    resumed_cb = EMACallback(decay=0.8)
    resumed = _trainer(make_tiny_llama(7), out, [resumed_cb], save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=True)

    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), n  # the precondition: training itself resumed exactly
    assert resumed_cb.ema.step == full_cb.ema.step == 6
    for name, t in full_cb.ema.shadow.items():
        assert torch.equal(resumed_cb.ema.shadow[name], t), name
    # The step-6 checkpoint holds that same EMA.
    saved = EMAWeights(make_tiny_llama(1), decay=0.8)
    saved.load(out / "checkpoint-6" / EMA_WEIGHTS_NAME)
    assert saved.step == 6 and all(torch.equal(saved.shadow[n], t) for n, t in full_cb.ema.shadow.items())


def _mean_loss(model, data, batch=4) -> float:
    """What Trainer.evaluate reports: per-batch mean loss, weighted by batch size."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i : i + batch]
            ids = torch.stack([d["input_ids"] for d in chunk])
            total += model(input_ids=ids, labels=ids).loss.item() * len(chunk)
            count += len(chunk)
    return total / count


def test_eval_with_ema_and_save_ema_model(tmp_path, caplog):
    eval_data = _lm_data(8, seed=2)
    callback = EMACallback(decay=0.7, eval_with_ema=True, save_ema_model=True)
    trainer = _trainer(
        make_tiny_llama(0), tmp_path, [callback], eval_data, max_steps=4, eval_strategy="steps", eval_steps=2
    )
    with caplog.at_level("WARNING", logger="forge.ema"):
        trainer.train()
    assert sum("averages over roughly" in r.message for r in caplog.records) == 1  # the run-length warning, once
    evals = [h for h in trainer.state.log_history if "eval_ema_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all("eval_loss" in h for h in trainer.state.log_history if "eval_runtime" in h)

    # save_ema_model: the model now holds the EMA and output_dir has it.
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, callback.ema.shadow[name]), name
    ema_model = trainer.model
    metrics = trainer.evaluate()
    assert metrics["eval_ema_loss"] == pytest.approx(_mean_loss(ema_model, eval_data), rel=1e-5)
    # Raw weights were restored after the EMA pass: eval_loss is the model's own loss.
    assert metrics["eval_loss"] == pytest.approx(_mean_loss(trainer.model, eval_data), rel=1e-5)
    named = trainer.evaluate({"holdout": eval_data})
    assert {"eval_holdout_loss", "eval_holdout_ema_loss"} <= set(named)


def test_eval_ema_loss_is_the_ema_models_loss(tmp_path):
    eval_data = _lm_data(8, seed=2)
    callback = EMACallback(decay=0.5, eval_with_ema=True)
    trainer = _trainer(make_tiny_llama(0), tmp_path, [callback], eval_data, max_steps=3)
    trainer.train()
    raw = _mean_loss(trainer.model, eval_data)
    ema_model = make_tiny_llama(0)
    callback.ema.copy_to(ema_model)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(raw, rel=1e-5)
    assert metrics["eval_ema_loss"] == pytest.approx(_mean_loss(ema_model, eval_data), rel=1e-5)
    assert metrics["eval_ema_loss"] != pytest.approx(raw, rel=1e-4)


def _recorder(names):
    """A callback that snapshots the named trainable tensors after every step."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        snaps: list[dict[str, torch.Tensor]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            self.snaps.append({n: params[n].detach().double().clone() for n in names})

    return Record()


def _reference_ema(start: dict[str, torch.Tensor], snaps, decay: float) -> dict[str, torch.Tensor]:
    ema = {n: t.double().clone() for n, t in start.items()}
    for snap in snaps:
        for n in ema:
            ema[n] = decay * ema[n] + (1 - decay) * snap[n]
    return ema


def _lora_run(model, tmp_path, **ema_kwargs):
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    recorder, callback = _recorder(trainable), EMACallback(decay=0.6, **ema_kwargs)
    trainer = _trainer(model, tmp_path, [recorder, callback], max_steps=4, learning_rate=5e-2)
    trainer.train()
    assert sorted(callback.ema.shadow) == sorted(trainable)
    expected = _reference_ema(start, recorder.snaps, 0.6)
    for n, t in callback.ema.shadow.items():
        torch.testing.assert_close(t.double(), expected[n], rtol=1e-5, atol=1e-6)
    return trainer, callback


def test_peft_lora_averages_only_the_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(make_tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer, callback = _lora_run(model, tmp_path, save_ema_model=True)
    assert all("lora_" in n for n in callback.ema.shadow)
    adapter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert callback.ema.nbytes == adapter_bytes
    assert (tmp_path / "adapter_model.safetensors").is_file()  # the adapter, not a full model
    reloaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path)
    params = dict(reloaded.named_parameters())
    for n, t in callback.ema.shadow.items():
        assert torch.equal(params[n], t), n


def test_qlora_4bit_averages_the_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    make_tiny_llama(0).save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    assert any(p.dtype == torch.uint8 for p in base.parameters())  # really 4-bit
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _lora_run(model, tmp_path / "run")
    # include_frozen adds the float base weights (norms, embeddings) but never the packed 4-bit ones.
    full = EMAWeights(model, include_frozen=True)
    assert all(t.is_floating_point() for t in full.shadow.values())
    assert any("norm" in n for n in full.shadow) and not any("q_proj.base_layer" in n for n in full.shadow)


# -- distributed ----------------------------------------------------------------------------
_DIST_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import safetensors.torch
    import torch, torch.distributed as dist
    from torch import nn
    sys.path.insert(0, os.environ["FORGE_TESTS"])
    from conftest import make_tiny_llama
    from transformers import Trainer, TrainingArguments
    from forge.ema import EMACallback, EMAWeights

    out = sys.argv[1]
    writes = []
    _save = safetensors.torch.save_file
    def spy(tensors, path, metadata=None):  # record who writes EMA files
        if "ema.safetensors" in str(path):
            writes.append(str(path))
        return _save(tensors, path, metadata=metadata)
    safetensors.torch.save_file = spy

    # ---- DDP through the Trainer
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": r, "labels": r.clone()} for r in torch.randint(0, 128, (32, 16), generator=gen)]
    args = TrainingArguments(output_dir=os.path.join(out, "ddp"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none",
                             disable_tqdm=True, ddp_backend="gloo", use_cpu=True, seed=0)
    assert args.parallel_mode.value == "distributed", args.parallel_mode  # CPU DDP needs use_cpu=True
    callback = EMACallback(decay=0.7)
    Trainer(model=make_tiny_llama(0), args=args, train_dataset=data, callbacks=[callback]).train()
    rank = dist.get_rank()
    ddp = {n: t.clone() for n, t in callback.ema.shadow.items()}
    ddp_writes = list(writes)

    # ---- FSDP2: local shards, gathered for saving
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = __import__("copy").deepcopy(model)
    fully_shard(model[0]); fully_shard(model[2]); fully_shard(model)
    ema, ref_ema = EMAWeights(model, decay=0.8), EMAWeights(reference, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(4, 6, generator=gen)  # same batch on both ranks: grads match one process
        for m, o in ((model, opt), (reference, ref_opt)):
            m(x).pow(2).mean().backward(); o.step(); o.zero_grad()
        ema.update(model); ref_ema.update(reference)
    params = dict(model.named_parameters())
    local_shapes = {n: list(t.shape) for n, t in ema.shadow.items()}
    assert all(list(params[n].to_local().shape) == s for n, s in local_shapes.items())
    full = ema.full_state_dict()
    fsdp_err = max((full[n] - t).abs().max().item() for n, t in ref_ema.shadow.items())
    before = len(writes)
    ema.save(os.path.join(out, "fsdp", "ema.safetensors"))
    fsdp_writes = writes[before:]
    dist.barrier()  # save() does not wait for the writer; loaders must
    again = EMAWeights(model, decay=0.8)
    again.load(os.path.join(out, "fsdp", "ema.safetensors"))
    reload_ok = all(torch.equal(again.shadow[n], t) for n, t in ema.shadow.items())
    raw = {n: p.to_local().clone() for n, p in params.items()}
    with ema.apply_to(model):
        swapped = all(torch.equal(params[n].to_local(), ema.shadow[n]) for n in raw)
    restored = all(torch.equal(params[n].to_local(), raw[n]) for n in raw)

    safetensors.torch.save_file = _save
    safetensors.torch.save_file(ddp, os.path.join(out, f"ddp_ema_rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(ddp_writes=ddp_writes, fsdp_writes=fsdp_writes, local_shapes=local_shapes,
                       fsdp_err=fsdp_err, reload_ok=reload_ok, swapped=swapped, restored=restored), f)
    dist.barrier()
    """
)


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """Two CPU processes (gloo): a DDP Trainer run with EMACallback, then an FSDP2 EMA."""
    out = tmp_path_factory.mktemp("dist")
    script = out / "dist_ema.py"
    script.write_text(_DIST_SCRIPT)
    env = dict(os.environ, FORGE_TESTS=str(REPO / "tests"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc = subprocess.run([*cmd, str(script), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_two_processes_same_ema_one_writer(dist_run):
    from safetensors.torch import load_file

    out, (rank0, rank1) = dist_run
    ema0, ema1 = (load_file(out / f"ddp_ema_rank{r}.safetensors") for r in (0, 1))
    assert ema0.keys() == ema1.keys() and all(torch.equal(ema0[n], ema1[n]) for n in ema0)
    ckpts = [str(out / "ddp" / f"checkpoint-{s}" / EMA_WEIGHTS_NAME) + ".tmp" for s in (2, 4)]
    assert rank0["ddp_writes"] == ckpts and rank1["ddp_writes"] == []
    saved = load_file(out / "ddp" / "checkpoint-4" / EMA_WEIGHTS_NAME)
    assert all(torch.equal(saved[n], ema0[n]) for n in ema0)


def test_fsdp2_keeps_local_shards_and_gathers_to_save(dist_run):
    out, (rank0, rank1) = dist_run
    # Uneven shards of the 5-row layer: 3 rows on rank 0, 2 on rank 1.
    assert rank0["local_shapes"]["0.weight"] == [3, 6] and rank1["local_shapes"]["0.weight"] == [2, 6]
    for r in (rank0, rank1):
        assert r["fsdp_err"] < 1e-6  # gathered EMA equals a single-process EMA of the same run
        assert r["reload_ok"] and r["swapped"] and r["restored"]
    assert len(rank0["fsdp_writes"]) == 1 and rank1["fsdp_writes"] == []
    assert (out / "fsdp" / EMA_WEIGHTS_NAME).is_file()
