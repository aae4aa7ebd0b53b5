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

from forge.core.distributed import (
    all_reduce_,
    before_deepspeed_step,
    deepspeed_engine,
    deepspeed_grad_scaling,
    grads_partitioned,
    local_grad,
    local_view,
    numel,
)
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
        """Whether the optimizer step about to run (``global_step + 1``) gets histograms, on
        every rank (computing them is a collective; only rank 0 logs them)."""
        every = getattr(self.spec, "histogram_every", 0) or 0
        return every > 0 and (state.global_step + 1) % every == 0


class HistogramTap:
    """Takes the gradient histograms a tracker logs, on every rank, where gradients exist.

    Computing them is a collective under sharding (:func:`grad_histograms`), so every rank
    takes them, whatever state its tracker is in; only rank 0 gets them back to log. Under
    DeepSpeed the gradients exist only inside DeepSpeed's optimizer step, which runs before the
    Trainer's ``on_pre_optimizer_step``: the tap takes them there
    (:func:`forge.core.distributed.before_deepspeed_step`).

    Example:
        >>> tap = HistogramTap(core)  # in a tracker callback: tap.begin() at on_train_begin,
        >>> # hists = tap.take(state, model) at on_pre_optimizer_step, tap.end() at the end
    """

    def __init__(self, core: TrackerCore) -> None:
        self.core = core
        self._pending: dict[str, dict[str, Any]] | None = None
        self._remove: Callable[[], None] | None = None

    def begin(self) -> None:
        from forge.core.trainer_lookup import find_trainer_on_stack

        self.end()
        trainer, _ = find_trainer_on_stack()
        engine = deepspeed_engine(trainer)
        if engine is not None:
            def grab() -> None:
                if self.core.histogram_due(trainer.state):
                    # Here, unlike at the Trainer's on_pre_optimizer_step, the gradients are
                    # not unscaled nor clipped yet: report them as the update will use them.
                    scale, clip = deepspeed_grad_scaling(engine)
                    self._pending = self.compute(trainer.model, 1.0 / scale, clip)

            self._remove = before_deepspeed_step(engine, grab)

    def take(self, state: Any, model: Any) -> dict[str, dict[str, Any]] | None:
        """This step's histograms on rank 0 (None elsewhere, or when none are due)."""
        if self._remove is None and model is not None and self.core.histogram_due(state):
            self._pending = self.compute(model)
        out, self._pending = self._pending, None
        return out if out and state.is_world_process_zero else None

    def compute(self, model: Any, factor: float = 1.0, max_norm: float = 0.0) -> dict[str, dict[str, Any]]:
        """The histograms of the gradients the update is made of, on every rank (a collective)."""
        return as_clipped(grad_histograms(model), factor, max_norm)

    def end(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


def grad_histograms(model: torch.nn.Module,
                    bins: int = HISTOGRAM_BINS) -> dict[str, dict[str, Any]]:
    """Histogram of the current gradients of each block (``layer_07``, ``embeddings``, ``head``).

    Runs on the gradients' device with two host copies in all (the blocks' ranges, then every
    count and sum at once), a few kernels per parameter, once per histogram interval. Blocks are
    the model's :class:`~forge.core.trainable.TrainableSet` groups (the monitor's too), so
    ``forge/grad_hist/layer_07`` sits beside ``forge/grad_norm/layer_07``. Frozen parameters
    are left out, and so is a block with a non-finite gradient (the monitor reports those).

    Under several processes it is a collective: call it on every rank. Each rank reads its part
    of each gradient (:func:`forge.core.distributed.local_grad`: the FSDP2 shard, the ZeRO
    partition, the full gradient under DDP), the ranges are reduced first and the counts and
    sums next, so every rank returns the histogram of the full gradient.

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
    params = [(n, p) for n, p in strip_wrappers(model).named_parameters() if p.requires_grad]
    grads = [(n, p, local_grad(p)) for n, p in params]
    # The blocks come from names and requires_grad, the same on every rank (never from which
    # gradients are present here), so every rank takes part in the same collectives.
    members: dict[str, list[tuple[torch.Tensor | None, int]]] = {}
    for name, p, g in grads:
        members.setdefault(ts.group_of(name), []).append((g, numel(p)))
    present = [g for _, _, g in grads if g is not None and g.numel() > 0]
    split = grads_partitioned([p for _, p in params])
    if not members or (not present and not split):
        return {}
    device = present[0].device if present else local_view(params[0][1]).device
    inf = torch.tensor(float("inf"), device=device)
    lows, highs, bad = [], [], []
    for gs in members.values():
        local = [g.detach() for g, _ in gs if g is not None and g.numel() > 0]
        lows.append(torch.stack([g.min().float().to(device) for g in local]).min() if local else inf)
        highs.append(torch.stack([g.max().float().to(device) for g in local]).max() if local else -inf)
        bad.append(torch.stack([(~torch.isfinite(g)).any().to(device) for g in local]).any().float()
                   if local else torch.zeros((), device=device))
    # One MIN-reduction carries the minima, the negated maxima and the negated non-finite flags.
    ranges = all_reduce_(torch.cat([torch.stack(lows), -torch.stack(highs), -torch.stack(bad)]), "min")
    ranges = ranges.cpu().tolist()  # the first host copy
    k = len(members)
    kept, rows = [], []
    for j, (name, gs) in enumerate(members.items()):
        lo, hi, broken = ranges[j], -ranges[k + j], ranges[2 * k + j] < 0
        total = sum(n for _, n in gs)
        if broken or not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        if not hi > lo:  # all equal (e.g. all zero): histc needs a non-empty range
            lo, hi = lo - 0.5, hi + 0.5
        row = torch.zeros(bins + 2, device=device)
        for g, _ in gs:
            if g is not None and g.numel() > 0:
                f = g.detach().float()
                row += torch.cat([torch.histc(f, bins=bins, min=lo, max=hi),
                                  torch.stack([f.sum(), f.pow(2).sum()])]).to(device)
        kept.append((name, lo, hi, total))
        rows.append(row)
    if not rows:
        return {}
    table = torch.stack(rows)
    if split:  # each rank counted its part of every gradient; replicated ones are counted once
        all_reduce_(table)
    host = table.cpu().double().tolist()  # the second and last host copy
    out = {}
    for (name, lo, hi, num), row in zip(kept, host):
        out[name] = {"min": lo, "max": hi, "num": int(num), "sum": row[bins],
                     "sum_squares": row[bins + 1],
                     "edges": torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist(),
                     "counts": row[:bins]}
    return out


def as_clipped(hists: dict[str, dict[str, Any]], factor: float = 1.0,
               max_norm: float = 0.0) -> dict[str, dict[str, Any]]:
    """The histograms of the gradients times ``factor``, then clipped to a total norm of
    ``max_norm`` (0: not clipped) as ``clip_grad_norm_`` would: every value scales by one
    positive number, so the counts stay and the ranges, edges and sums scale.

    Example:
        >>> h = {"b": {"min": -3.0, "max": 4.0, "num": 2, "sum": 1.0, "sum_squares": 25.0,
        ...            "edges": [-3.0, 4.0], "counts": [1.0]}}
        >>> round(as_clipped(h, 1.0, 1.0)["b"]["max"], 6)  # norm 5 clipped to 1
        0.8
    """
    if max_norm > 0:
        norm = math.sqrt(sum(h["sum_squares"] for h in hists.values())) * factor
        factor *= min(1.0, max_norm / (norm + 1e-6))
    if factor == 1.0:
        return hists
    return {block: {**h, "min": h["min"] * factor, "max": h["max"] * factor, "sum": h["sum"] * factor,
                    "sum_squares": h["sum_squares"] * factor * factor,
                    "edges": [e * factor for e in h["edges"]]}
            for block, h in hists.items()}
