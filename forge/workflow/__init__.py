"""After training: merge and export, generate and chat, evaluate (``forge merge``, ``forge chat``,
``forge generate``, ``forge eval``), each on a run's output directory.

Example:
    >>> from forge.workflow import evaluate_run, generate_run, merge_run
    >>> merge_run("outputs/lora", "outputs/lora-merged", dtype="bfloat16")
    >>> evaluate_run("outputs/lora", "held_out.jsonl")["perplexity"]
"""

from __future__ import annotations

from forge.workflow.evaluate import evaluate_run
from forge.workflow.generate import chat, generate, generate_run
from forge.workflow.merge import merge_run
from forge.workflow.run import RunDir, load_start, load_trained, read_run

__all__ = ["RunDir", "chat", "evaluate_run", "generate", "generate_run", "load_start", "load_trained",
           "merge_run", "read_run"]
