"""One-line notes to the user: ``forge: ...`` on stdout, from the main process only.

Each forge feature says in one line what it did at the start of a run (blocks frozen, EMA
size, autotune's choice, the loss path, the checkpoint a resume continued from), so nobody
has to read a log to learn what a preset switched on.
"""

from __future__ import annotations

from forge.core.distributed import is_main_process


def note(message: str) -> None:
    """Print ``forge: message`` once (main process), flushed so it precedes library output."""
    if is_main_process():
        print(f"forge: {message}", flush=True)
