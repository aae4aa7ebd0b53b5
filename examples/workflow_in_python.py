"""Mix two data sources, train a LoRA adapter, then evaluate, merge and try it, all from Python.

    python examples/workflow_in_python.py

Runs offline in ~30 s on CPU on the bundled tiny Llama: the bundled demo chats mixed 3:1 with a
question/answer file whose columns are renamed, `forge.train`, then `forge.workflow`'s
`evaluate_run` (held-out perplexity of the trained model and of the base it started from),
`merge_run` (a plain safetensors model) and `generate_run`.
"""

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import forge  # noqa: E402
from forge.workflow import evaluate_run, generate_run, merge_run  # noqa: E402

work = Path(tempfile.mkdtemp())
qa = work / "qa.jsonl"  # another file's column names: question / answer
qa.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."})
                      + "\n" for i in range(40)))
held_out = work / "held_out.jsonl"
held_out.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "completion": f"{i} plus 1 is {i + 1}."})
                            + "\n" for i in range(10)))

preset = forge.load_preset("lora", {
    "model.name_or_path": "builtin:tiny-llama",
    "data.sources": [{"path": "builtin:demo-sft", "weight": 3},
                     {"path": str(qa), "weight": 1, "columns": {"question": "prompt", "answer": "completion"}}],
    "data.max_length": 64,
    "training.max_steps": 12,
    "training.learning_rate": 5e-3,
    "training.per_device_train_batch_size": 8,
    "training.gradient_accumulation_steps": 1,
    "training.logging_steps": 4,
    "training.output_dir": str(work / "run"),
})
run = forge.train(preset).output_dir

trained = evaluate_run(run, str(held_out))
base = evaluate_run(run, str(held_out), base=True)
print(f"held-out perplexity: trained {trained['perplexity']:.1f} vs base {base['perplexity']:.1f}")
merged = merge_run(run, str(work / "merged"))
print(f"merged model files: {sorted(p.name for p in Path(merged).iterdir())}")
(row,) = generate_run(merged, [{"prompt": [{"role": "user", "content": "What is 3 plus 1?"}]}],
                      max_new_tokens=8)
print(f"merged model answers: {row['completion']!r}")
