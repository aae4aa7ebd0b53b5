"""What the three tracker callbacks of :mod:`forge.trackers` share.

* :class:`TrackerCore`: the spec, the redacted preset, and the guard that turns a tracker's
  failure into one warning (training goes on; the tracker is switched off for the run);
* :func:`grad_histograms`: per-block gradient histograms, computed on the device;
* :func:`redacted_args`: the ``TrainingArguments`` the stock callbacks log, secrets removed;
* :func:`require`: the one-line error naming the extra to install.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
from typing import Any, Callable

import torch

from forge.core.figures import PREFIX
from forge.core.trainable import trainable_set
from forge.core.unwrap import strip_wrappers
from forge.errors import ForgeError
from forge.trackers.redact import redact, redact_text, redact_yaml

logger = logging.getLogger("forge.trackers")

FORGE_PREFIX = PREFIX  # a log key under this prefix is a forge figure
HISTOGRAM_PREFIX = FORGE_PREFIX + "grad_hist/"
HISTOGRAM_BINS = 64

# tracker name -> (module that must import, pip extra of transformers-forge)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


class MissingTrackerError(ForgeError, ImportError):
    """A tracker was asked for but its package is not installed (one line: what to install)."""


def require(name: str) -> None:
    """Raise :class:`MissingTrackerError` unless the package behind tracker ``name`` imports.

    Example:
        >>> require("tensorboard")  # installed: nothing happens
    """
    module, extra = PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        raise MissingTrackerError(
            f"trackers: {name} needs the '{module}' package: "
            f'pip install "transformers-forge[{extra}]"')


def split_forge(logs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(forge figures, everything else)``: forge keys keep their name in every tracker.

    Example:
        >>> split_forge({"loss": 1.0, "forge/grad_norm/layer_07": 0.5})
        ({'forge/grad_norm/layer_07': 0.5}, {'loss': 1.0})
    """
    forge = {k: v for k, v in logs.items() if k.startswith(FORGE_PREFIX)}
    return forge, {k: v for k, v in logs.items() if not k.startswith(FORGE_PREFIX)}


def redacted_args(args: Any) -> Any:
    """A shallow copy of ``TrainingArguments`` whose ``to_dict()`` has secrets redacted.

    The stock callbacks log ``args.to_dict()`` (W&B config, MLflow params, TensorBoard text);
    transformers masks ``*_token`` fields only, this also catches keys and token-shaped values
    elsewhere (``model_init_kwargs``, a ``run_name`` holding a URL with a password, ...).
    """
    safe = copy.copy(args)
    original = args.to_dict
    safe.to_dict = lambda: redact(original())  # an instance attribute shadows the method
    safe.to_json_string = lambda: json.dumps(safe.to_dict(), indent=2, default=str)
    return safe


class TrackerCore:
    """State every forge tracker callback holds: its spec, the preset, and the failure guard.

    Args:
        name: ``tensorboard``, ``wandb`` or ``mlflow`` (used in the warning).
        spec: the tracker's spec dataclass.
        preset_yaml: the resolved preset as YAML (redacted here, once).
    """

    def __init__(self, name: str, spec: Any, preset_yaml: str | None) -> None:
        self.name = name
        self.spec = spec
        self.preset_yaml = redact_yaml(preset_yaml) if preset_yaml else None
        self.failed = False

    def guard(self, event: str, fn: Callable[..., Any], *args: Any, on_failure: Callable[[], None]
              | None = None, **kwargs: Any) -> None:
        """Run one callback event; on the first exception warn once and switch the tracker off.

        A tracker is an observer: a dead server or a full disk must not cost the training run.
        """
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracker failure, by design
            self.failed = True
            message = redact_text(str(err).strip().splitlines()[0] if str(err).strip() else "")
            logger.warning("forge: the %s tracker failed in %s (%s: %s); it is switched off "
                           "for the rest of this run, training goes on.",
                           self.name, event, type(err).__name__, message)
            if on_failure is not None:
                try:
                    on_failure()
                except Exception:  # noqa: BLE001 - already broken; nothing more to report
                    pass

    def histogram_due(self, state: Any) -> bool:
        """Whether the optimizer step about to run (``global_step + 1``) gets histograms."""
        every = getattr(self.spec, "histogram_every", 0) or 0
        return every > 0 and state.is_world_process_zero and (state.global_step + 1) % every == 0


def grad_histograms(model: torch.nn.Module,
                    bins: int = HISTOGRAM_BINS) -> dict[str, dict[str, Any]]:
    """Histogram of the current gradients of each block (``layer_07``, ``embeddings``, ``head``).

    Runs on the gradients' device with two host copies in all (the blocks' ranges, then every
    count and sum at once), a few kernels per parameter, once per histogram interval. Blocks are
    the model's :class:`~forge.core.trainable.TrainableSet` groups (the monitor's too), so ``forge/grad_hist/layer_07`` sits beside
    ``forge/grad_norm/layer_07``. Parameters without a gradient (frozen) are left out, and so
    is a block with a non-finite gradient (the monitor reports those).

    Returns:
        ``{block: {"min", "max", "num", "sum", "sum_squares", "edges" (bins + 1 floats),
        "counts" (bins floats)}}``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> grad_histograms(model, bins=4)["other"]["num"]
        4
    """
    ts = trainable_set(model)
    named = [(n, p.grad.detach()) for n, p in strip_wrappers(model).named_parameters()
             if p.grad is not None and p.grad.numel() > 0]
    if not named:
        return {}
    device = named[0][1].device
    members: dict[str, list[torch.Tensor]] = {}
    for name, grad in named:
        members.setdefault(ts.group_of(name), []).append(grad)
    ranges = torch.stack([  # [blocks, 2]: each block's min and max, one host copy
        torch.stack([torch.stack([g.min() for g in gs]).float().min().to(device),
                     torch.stack([g.max() for g in gs]).float().max().to(device)])
        for gs in members.values()]).cpu().tolist()
    kept, rows = [], []
    for (name, grads), (lo, hi) in zip(members.items(), ranges):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        if not hi > lo:  # all equal (e.g. all zero): histc needs a non-empty range
            lo, hi = lo - 0.5, hi + 0.5
        counts = sum(torch.histc(g.float(), bins=bins, min=lo, max=hi).to(device) for g in grads)
        sums = sum(torch.stack([g.float().sum(), g.float().pow(2).sum()]).to(device) for g in grads)
        kept.append((name, lo, hi, sum(g.numel() for g in grads)))
        rows.append(torch.cat([counts, sums]))
    if not rows:
        return {}
    host = torch.stack(rows).cpu().double().tolist()  # the second and last host copy
    out = {}
    for (name, lo, hi, num), row in zip(kept, host):
        out[name] = {"min": lo, "max": hi, "num": int(num), "sum": row[bins],
                     "sum_squares": row[bins + 1],
                     "edges": torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist(),
                     "counts": row[:bins]}
    return out
