"""``forge report RUN_DIR``: one self-contained HTML page about a finished run, no tracker needed.

It reads only the run's own files: ``trainer_state.json`` (which ``forge train`` writes into the
output directory) and ``checkpoint-*/trainer_state.json``, ``monitor_summary.json`` (from the
gradient monitor), a freeze schedule's ``forge_<kind>.json`` and ``forge_preset.yaml`` when
present, and plots loss and learning rate, per-block gradient norms as a heat map over steps
with anomalies marked, EMA against raw evaluation loss, throughput, and every feature's
``forge/<feature>/...`` figures (EMA, freeze with the schedule's changes, loss, autotune) as a
plot and a table each. A series or feature the run did not record is skipped with a note.

    python -m forge.report outputs/demo          # writes outputs/demo/report/report.html

Example:
    >>> from forge.report import write_report
    >>> write_report("outputs/demo")  # doctest: +SKIP
    PosixPath('outputs/demo/report/report.html')
"""

from forge.report.files import RunFiles, load_run
from forge.report.page import collect_series, write_report

__all__ = ["RunFiles", "collect_series", "load_run", "write_report"]
