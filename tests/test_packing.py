"""Packing done right: packed examples never attend to each other (a token's logits are the same
alone and packed beside another example, on the trainer's own batches and forward), and the
completion-only / assistant-only loss mask survives packing."""

from __future__ import annotations

import json

import pytest
import torch

import forge
from forge.recipes.runner import build_trainer

PACKED = {"model.name_or_path": "builtin:tiny-llama", "data.packing": True, "data.max_length": 96,
          "data.max_samples": 24, "training.per_device_train_batch_size": 4, "training.max_steps": 1,
          "training.output_dir": None}


def _trainer(tmp_path, **overrides):
    values = {**PACKED, "training.output_dir": str(tmp_path / "out"), **overrides}
    return build_trainer(forge.load_preset("demo", values))


def _segments(position_ids):
    """(start, end) of each packed example in a padding-free row."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return [(a, b) for a, b in zip(starts, starts[1:])]


def _final_hidden(trainer, batch):
    """The last hidden states of the trainer's own loss computation on ``batch`` (the input
    of the LM head, also where forge's fused head starts)."""
    model = trainer.model
    seen = []
    handle = model.get_base_model().model.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        model.eval()  # no dropout: the two runs must be comparable
        with torch.no_grad():
            trainer.compute_loss(model, dict(batch))
    finally:
        handle.remove()
    return seen[0][0]


@pytest.mark.parametrize("attn, fused", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_a_packed_example_sees_only_itself(attn, fused, tmp_path, one_thread):
    overrides = {"model.attn_implementation": attn, "peft": {"r": 8, "target_modules": "all-linear"}}
    if fused:
        overrides["loss"] = {"fused": True}
    trainer = _trainer(tmp_path, **overrides)
    assert trainer.padding_free  # TRL's bfd packing collates padding-free, with position ids
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    segments = _segments(batch["position_ids"][0])
    assert len(segments) >= 3
    packed = _final_hidden(trainer, batch)
    for start, end in segments[1:3]:  # examples with others packed before them
        ids = batch["input_ids"][0, start:end]
        alone = trainer.data_collator([{"input_ids": ids.tolist(), "seq_lengths": [end - start]}])
        torch.testing.assert_close(packed[start:end], _final_hidden(trainer, alone)[: end - start],
                                   atol=1e-5, rtol=1e-5)
    # The check can fail: without the position ids (one long sequence) the same rows differ.
    leaky = {k: v for k, v in batch.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                                         "max_length_q", "max_length_k", "seq_idx")}
    start, end = segments[1]
    assert (_final_hidden(trainer, leaky)[start:end] - packed[start:end]).abs().max() > 1e-3


def _rows(trainer):
    """Every packed example of every batch, (input ids, labels); checks that rows were packed."""
    out = []
    for batch in trainer.get_train_dataloader():
        for start, end in _segments(batch["position_ids"][0]):
            out.append((batch["input_ids"][0, start:end].tolist(), batch["labels"][0, start:end].tolist()))
    assert len(trainer.train_dataset) < len(out)  # fewer packed rows than examples
    return out


def test_completion_only_mask_survives_packing(tmp_path, one_thread):
    rows = [json.loads(line) for line in open(forge.demo.HERE / "demo_dpo.jsonl")][:24]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    trainer = _trainer(tmp_path, **{"data.path": str(data)})
    tok = trainer.processing_class
    expected = {}
    for r in rows:  # independent: the prompt's tokens (with the generation prompt) are no targets
        prompt = [{"role": "user", "content": r["prompt"]}]
        ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": r["chosen"]}], tokenize=True,
                                      return_dict=True)["input_ids"]
        n = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])
        expected[tuple(ids)] = [-100] * n + ids[n:]
    packed = _rows(trainer)
    assert len(packed) == len(rows)
    assert sum(-100 in labels for _, labels in packed) == len(rows)  # every prompt is masked
    for ids, labels in packed:
        assert labels == expected[tuple(ids)]


def test_assistant_only_mask_survives_packing(tmp_path, one_thread):
    trainer = _trainer(tmp_path, **{"training.assistant_only_loss": True})
    tok = trainer.processing_class
    rows = [json.loads(line) for line in open(forge.demo.HERE / "demo_sft.jsonl")][:24]
    expected = {}
    for r in rows:  # independent: character spans of the assistant turns in the rendered chat
        text = tok.apply_chat_template(r["messages"], tokenize=False)
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        spans, pos = [], 0
        for m in r["messages"]:
            start = text.index(m["content"], pos)
            pos = start + len(m["content"])
            if m["role"] == "assistant":
                spans.append((start, pos + len("<|im_end|>")))  # the end-of-turn token is trained too
        keep = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
        expected[tuple(enc["input_ids"])] = [t if k else -100 for t, k in zip(enc["input_ids"], keep)]
    packed = _rows(trainer)
    assert len(packed) == len(rows)
    for ids, labels in packed:
        want = expected[tuple(ids)]
        assert labels[1:] == want[1:] and labels[0] == -100  # a segment's first token is never a target
        assert any(t != -100 for t in labels)


def test_wrapped_packing_is_said_to_mix_examples(tmp_path, capsys, one_thread):
    _trainer(tmp_path, **{"training.packing_strategy": "wrapped"})
    out = capsys.readouterr().out
    assert "packing_strategy=wrapped: examples are concatenated and cut every 96 tokens, and attend" in out
    _trainer(tmp_path / "b")
    assert "position ids restart per example, so packed examples do not attend" in capsys.readouterr().out
