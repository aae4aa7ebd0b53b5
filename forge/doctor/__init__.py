"""Pre-flight checks: the silent bugs of a fine-tuning run, found before it trains.

One :class:`Check` per concern, each OK / WARN / FAIL with a one-line reason: the loss mask
(and an example with its supervised span marked), the end-of-turn token, truncation,
packing, duplicate and blank rows, DPO pairs that train nothing, refused feature
combinations, and memory. The data checks run on TRL's own tokenisation and collation, so
they see what training sees. ``forge doctor PRESET`` runs them (and a resume check) from the
command line; ``forge train`` runs the ones that need no model weights before it loads one.

Example:
    >>> from forge.doctor import check_trainer, format_checks
    >>> print(format_checks(check_trainer(trainer)))     # any TRL SFTTrainer
    OK    loss mask: every example supervises tokens: 18-40% of tokens (median 27%); ...
    OK    eos: the end-of-turn token '<|im_end|>' is supervised in every example; ...
"""

from forge.doctor.checks import check_trainer, data_checks
from forge.doctor.combos import COMBINATIONS, Combination, Setup, check_combinations
from forge.doctor.memory import check_memory
from forge.doctor.result import (
    FAIL,
    OK,
    WARN,
    Check,
    failures,
    format_checks,
    format_line,
    read_checks,
    summary,
    write_checks,
)

__all__ = ["COMBINATIONS", "FAIL", "OK", "WARN", "Check", "Combination", "Setup", "check_combinations",
           "check_memory", "check_trainer", "data_checks", "failures", "format_checks", "format_line",
           "read_checks", "summary", "write_checks"]
