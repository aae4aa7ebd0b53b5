"""forge doctor: each failure it claims to catch, built for real, is caught; a healthy demo is OK.

The references are independent of the doctor's own code: a real TRL ``SFTTrainer``'s prepared
``train_dataset`` (what training sees), the rows a real trainer drops, and a real model's
logits for packed and unpacked examples.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

import forge
from forge.doctor import FAIL, OK, WARN, data_checks, format_checks
from forge.doctor.prepare import prepare_sft, sft_collator, with_row_index
from forge.recipes.data import load_examples
from forge.recipes.model import load_model, load_tokenizer


def by_name(checks):
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def demo():
    preset = forge.load_preset("demo", {"data.max_samples": 48})
    return preset, load_tokenizer(preset.model), load_examples("builtin:demo-sft", "sft", max_samples=48)


def _args(preset, **changes):
    args = preset.training_args()
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def _rows(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def unique_demo_rows(tmp_path, n=60):
    seen, rows = set(), []
    for line in open(forge.demo.builtin_data_path("demo-sft")):
        if line not in seen:
            seen.add(line)
            rows.append(json.loads(line))
    return _rows(tmp_path, rows[:n], "unique.jsonl")


def test_doctor_sees_what_a_real_sft_trainer_trains_on(demo, one_thread, tmp_path):
    import trl

    preset, tok, rows = demo
    args = _args(preset, assistant_only_loss=True, output_dir=str(tmp_path), shuffle_dataset=False)
    ours = prepare_sft(with_row_index(rows), tok, args, max_length=args.max_length)
    trainer = trl.SFTTrainer(model=load_model(preset.model), args=args, train_dataset=rows, processing_class=tok)
    theirs = trainer.train_dataset
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    checks = by_name(data_checks(rows, tok, args, "sft"))
    assert checks["loss mask"].status == OK
    supervised = [sum(x != -100 for x in r["labels"]) / len(r["labels"]) for r in theirs]
    assert checks["loss mask"].data["min_fraction"] == pytest.approx(min(supervised))
    # The example shown marks exactly the assistant reply and its end-of-turn token.
    assert "[[The opposite of strong is weak.<|im_end|>]]" in checks["loss mask"].details[0]


def test_a_template_without_generation_markers_fails_assistant_only_loss(demo):
    preset, _, rows = demo
    tok = load_tokenizer(preset.model)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    checks = by_name(data_checks(rows, tok, _args(preset, assistant_only_loss=True), "sft"))
    assert checks["loss mask"].status == FAIL
    assert "generation" in checks["loss mask"].message
    # The same template trains fine on every token when assistant-only loss is off.
    assert by_name(data_checks(rows, tok, _args(preset), "sft"))["loss mask"].status == OK


def test_an_example_with_nothing_supervised_fails(demo):
    preset, _, _ = demo
    # Generation markers that enclose nothing: the assistant mask of every example is empty.
    tok = load_tokenizer(preset.model)
    tok.chat_template = tok.chat_template.replace(
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{{- message['content'] + '<|im_end|>' }}{% generation %}{% endgeneration %}")
    rows = load_examples("builtin:demo-sft", "sft", max_samples=8)
    checks = by_name(data_checks(rows, tok, _args(preset, assistant_only_loss=True), "sft"))
    assert checks["loss mask"].status == FAIL


class MasksPadById:
    """A hand-written collator with the classic bug: labels at the pad id are masked."""

    def __init__(self, tokenizer, args):
        self.inner = sft_collator(tokenizer, args)
        self.pad = tokenizer.pad_token_id

    def __call__(self, examples):
        batch = self.inner(examples)
        batch["labels"][batch["input_ids"] == self.pad] = -100
        return batch


def test_pad_equal_to_eos_and_masked_fails_eos(demo):
    preset, _, rows = demo
    tok = load_tokenizer(preset.model)
    tok.pad_token = tok.eos_token  # what a tokenizer without a pad token gets
    args = _args(preset)
    bad = by_name(data_checks(rows, tok, args, "sft", collator=MasksPadById(tok, args)))["eos"]
    assert bad.status == FAIL and "never learns to stop" in bad.message
    # Independently: that collator really leaves no EOS trained in any example.
    first = prepare_sft(with_row_index(rows), tok, args, max_length=None)[0]
    batch = MasksPadById(tok, args)([{"input_ids": first["input_ids"], "labels": first["labels"]}])
    assert not ((batch["input_ids"] == tok.eos_token_id) & (batch["labels"] != -100)).any()
    # TRL's collator masks padding by position: pad == EOS is then harmless.
    good = by_name(data_checks(rows, tok, args, "sft"))["eos"]
    assert good.status == OK and good.data["pad_is_eos"]
    # A separate pad token: OK, and the message says so.
    assert "differs from EOS" in by_name(data_checks(rows, load_tokenizer(preset.model), args, "sft"))["eos"].message


def test_an_over_long_response_warns_and_a_lost_response_is_counted_as_trl_drops_it(demo, tmp_path, one_thread):
    import trl

    preset, tok, _ = demo
    long_reply = " ".join(["the opposite of big is small"] * 30)
    def chat(question, answer):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    rows = load_examples(str(_rows(tmp_path, [chat("What is big?", "Big is big."), chat("Say it long.", long_reply),
                                              chat(" ".join(["a long question"] * 40), "Yes.")])), "sft")
    # Assistant-only loss: a prompt that fills max_length leaves that example nothing to train.
    args = _args(preset, max_length=48, assistant_only_loss=True, output_dir=str(tmp_path / "out"))
    checks = by_name(data_checks(rows, tok, args, "sft"))
    cut = checks["truncation"]
    assert cut.status == WARN and cut.data["cut"] == 2
    trainer = trl.SFTTrainer(model=load_model(preset.model), args=args, train_dataset=rows, processing_class=tok)
    assert cut.data["whole_response_removed"] == len(rows) - len(trainer.train_dataset) == 1
    assert checks["eos"].status == WARN  # the long reply lost its end-of-turn token
    assert checks["eos"].data["cut"] == 1


def test_chosen_equal_to_rejected_warns_and_all_equal_fails(tmp_path):
    preset = forge.load_preset("demo", {"method": "dpo", "data.path": "builtin:demo-dpo"})
    tok = load_tokenizer(preset.model)
    pairs = [{"prompt": "2+2?", "chosen": "4.", "rejected": "5."},
             {"prompt": "3+3?", "chosen": "6.", "rejected": "6."}]
    rows = load_examples(str(_rows(tmp_path, pairs)), "dpo")
    checks = by_name(data_checks(rows, tok, preset.training_args(), "dpo"))
    assert checks["pairs"].status == WARN and checks["pairs"].data["chosen_equals_rejected"] == 1
    same = load_examples(str(_rows(tmp_path, [pairs[1]] * 2, "same.jsonl")), "dpo")
    assert by_name(data_checks(same, tok, preset.training_args(), "dpo"))["pairs"].status == FAIL
    # Pairs that differ only past max_length are identical to the trainer.
    tail = [{"prompt": "Count.", "chosen": "one two three four", "rejected": "one two three five"}]
    cut = load_examples(str(_rows(tmp_path, tail, "tail.jsonl")), "dpo")
    args = preset.training_args()
    args.max_length = 12
    assert by_name(data_checks(cut, tok, args, "dpo"))["pairs"].data["equal_after_truncation"] == 1


def test_packing_verdict_agrees_with_a_real_model(demo, one_thread):
    from transformers import AutoConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from forge.doctor.lengths import check_packing
    from forge.recipes.model import resolve_model_path

    preset, tok, rows = demo
    args = _args(preset, packing=True, max_length=96)
    packed = prepare_sft(with_row_index(rows), tok, args, max_length=96, packing=True)
    config = AutoConfig.from_pretrained(resolve_model_path(preset.model.name_or_path))
    good = check_packing(packed, sft_collator(tok, args), config)
    leaky_collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=False)
    leaky = check_packing(packed, leaky_collator, config)
    assert good.status == OK and leaky.status == FAIL and leaky.data["cross_example_pairs"] > 0

    # The reference: the second example of a packed row, run packed and run alone.
    model = load_model(preset.model).eval()
    row = next(r for r in packed if len(r["seq_lengths"]) > 1)
    first, second = row["seq_lengths"][0], row["seq_lengths"][1]
    alone = torch.tensor([row["input_ids"][first:first + second]])
    with torch.no_grad():
        ref = model(input_ids=alone, use_cache=False).logits[0]
        for collator, expect_equal in ((sft_collator(tok, args), True), (leaky_collator, False)):
            batch = collator([{k: row[k] for k in ("input_ids", "labels", "seq_lengths")}])
            batch.pop("labels")
            inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
            # use_cache=False, as TRL's SFTTrainer calls the model: with a KV cache transformers does
            # not build per-example masks from position ids (a plain forward would leak).
            got = model(**inputs, use_cache=False).logits[0, first:first + second]
            assert torch.allclose(got, ref, atol=1e-4) == expect_equal


def test_duplicates_blank_rows_and_eval_leaks(tmp_path):
    from forge.doctor.rows import check_rows

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    blank = [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]
    rows = [{"messages": msgs}] * 3 + [{"messages": blank}] + [{"messages": [msgs[0], {**msgs[1], "content": "x"}]}]
    checks = by_name(check_rows(rows, eval_rows=[{"messages": msgs}]))
    assert checks["duplicates"].status == WARN and checks["duplicates"].data["repeated"] == 2
    assert checks["duplicates"].data["eval_rows_in_training"] == 1
    assert checks["blank rows"].status == WARN and "rows 4" in checks["blank rows"].message


def test_healthy_demo_data_is_all_ok_and_the_demo_itself_only_warns_of_its_repeats(tmp_path, capsys):
    from forge import cli
    from forge.recipes.doctor import doctor_preset

    healthy = doctor_preset(forge.load_preset("demo", {"data.path": str(unique_demo_rows(tmp_path))}),
                            max_memory="4GB")
    assert [c.status for c in healthy] == [OK] * len(healthy), format_checks(healthy)
    assert {c.name for c in healthy} >= {"combination", "duplicates", "loss mask", "eos", "truncation", "memory"}
    # The shipped demo repeats 151 of its 400 rows: the doctor says so, and nothing else.
    assert cli.main(["doctor", "demo", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert "WARN  duplicates: 151 of 400 rows" in out and "FAIL" not in out.replace("0 FAIL", "")


def test_memory_check_fails_when_one_step_does_not_fit(demo, one_thread):
    from forge.core.memory import LiveBytes
    from forge.doctor import check_memory

    preset, _, _ = demo
    args = _args(preset, per_device_train_batch_size=4, gradient_checkpointing=False)
    model = load_model(preset.model)
    fits = check_memory(model, args, seq_len=64, max_memory="1GB")
    assert fits.status == OK
    need = fits.data["needed"]
    assert check_memory(model, args, seq_len=64, max_memory=need // 2).status == FAIL
    assert check_memory(model, args, seq_len=64, max_memory=int(need * 1.05)).status == WARN
    # Independent measure: weights + every tensor alive at the peak of a real step.
    ids = torch.randint(0, 200, (4, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    with LiveBytes() as live:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0.5 < need / (weights + live.peak) < 2.0


def test_forge_doctor_exits_1_on_a_fail_and_train_stops_with_the_failing_line(tmp_path, capsys):
    from forge import cli

    assert cli.main(["doctor", "demo", "--no-memory", "--set", "autotune.enabled=true"]) == 1
    assert "FAIL  combination: autotune: enabled on a machine without an accelerator" in capsys.readouterr().out
    out = tmp_path / "run"
    assert cli.main(["train", "demo", "--set", "autotune.enabled=true", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "forge: error: doctor: FAIL  combination:" in err and "--no-doctor" in err
    assert not out.exists()  # stopped before anything was written


def test_train_prints_warnings_records_the_checks_and_the_report_shows_them(tmp_path, capsys, one_thread):
    from forge import cli
    from forge.report import write_report

    out = tmp_path / "run"
    assert cli.main(["train", "demo", "--max-steps", "1", "--output-dir", str(out),
                     "--set", "data.max_samples=32", "--set", "data.max_length=30"]) == 0
    stdout = capsys.readouterr().out
    assert "forge: doctor: WARN  truncation:" in stdout
    recorded = json.loads((out / "doctor.json").read_text())
    assert {c["name"]: c["status"] for c in recorded["checks"]}["truncation"] == WARN
    page = write_report(out).read_text()
    assert "Pre-flight checks" in page and "truncation" in page
    # --no-doctor: no checks, no doctor.json (and --overwrite clears the old one).
    assert cli.main(["train", "demo", "--max-steps", "1", "--output-dir", str(out), "--overwrite",
                     "--no-doctor", "--set", "data.max_samples=16"]) == 0
    assert "forge: doctor:" not in capsys.readouterr().out and not (out / "doctor.json").exists()


class ForgetsOnResume(TrainerCallback):
    """A stateful piece that does not round-trip: it halves the first update a process makes."""

    def __init__(self):
        self.seen = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen += 1
        if self.seen == 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(0.5)


def test_resume_check_passes_on_the_demo_and_catches_a_resume_that_forgets(monkeypatch, one_thread):
    from forge.recipes import runner
    from forge.recipes.doctor_resume import check_resume

    preset = forge.load_preset("demo", {"data.max_length": 48, "training.per_device_train_batch_size": 4})
    ok = check_resume(preset)
    assert ok.status == OK and ok.data["max_weight_difference"] == 0.0, ok.message
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: real_train(*a, **k, callbacks=[ForgetsOnResume()]))
    broken = check_resume(preset)
    assert broken.status == FAIL and "weights differ" in broken.message
