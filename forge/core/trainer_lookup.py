"""Find the Trainer that is running a callback: callback events carry no reference to it.

Called from a callback event, the chain is ``Trainer._inner_training_loop`` ->
``CallbackHandler.on_*`` -> ``CallbackHandler.call_event`` -> the callback, so the Trainer is
a few frames up. EMA and the gradient monitor both need it (to find the resume checkpoint,
and to see gradients before clipping).
"""

from __future__ import annotations

import inspect
import os
from typing import Any


def find_trainer_on_stack(max_depth: int = 16) -> tuple[Any | None, str | None]:
    """The ``Trainer`` whose training loop is running, and its resume path, if any.

    Walks up from the caller to the first frame whose ``self`` is a ``transformers.Trainer``
    (``_inner_training_loop`` calls the callback handler, which calls the callback).
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        f = frame.f_back if frame is not None else None
        for _ in range(max_depth):
            if f is None:
                break
            owner = f.f_locals.get("self")
            if isinstance(owner, Trainer):
                resume = f.f_locals.get("resume_from_checkpoint")
                return owner, os.fspath(resume) if isinstance(resume, (str, os.PathLike)) else None
            f = f.f_back
    finally:
        del frame  # frames hold references to every local above us
    return None, None
