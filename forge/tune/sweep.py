"""``forge sweep``: hyperparameter search through Optuna, each trial a forge run of its own.

Every trial is ``forge train`` on the preset with the trial's values (preset keys, see
:mod:`forge.tune.space`), in ``SWEEP_DIR/trial-NNN``; its objective is the final evaluation
loss. Trials report their evaluation loss as they train and the pruner (median by default)
stops the ones that fall behind. The study lives in ``SWEEP_DIR/study.db`` (sqlite), so
running the same command again continues it: finished trials are kept, a trial that was
interrupted is run again with new values, and the count goes on to ``--trials``.

The Trainer's own ``hyperparameter_search`` does not fit: it re-creates only the model per
trial (``model_init``) and sets only ``TrainingArguments`` fields, while a forge trial is a
whole preset (``peft.r``, ``data.max_length``, the features bound to each model) with its own
output directory.

Example:
    >>> result = sweep("lora", "space.yaml", trials=20, overrides={"model.name_or_path": "Qwen/Qwen3-0.6B"})
    >>> result.best["eval_loss"], result.best["training.learning_rate"]
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from forge.config.schema import has_eval
from forge.core.console import note
from forge.errors import ForgeError
from forge.tune.results import OBJECTIVE, best_row, trial_rows, write_results
from forge.tune.space import Param, load_space

STUDY_FILE = "study.db"
STUDY_NAME = "forge-sweep"
EVAL_FRACTION = 0.1  # held out when the preset has no evaluation set: the objective needs one


def require_optuna() -> Any:
    """``import optuna``, or a one-line ForgeError naming the extra to install."""
    try:
        import optuna
    except ImportError:
        raise ForgeError('forge sweep needs optuna: pip install "transformers-forge[sweep]"') from None
    return optuna


class PruneOnEval(TrainerCallback):
    """Reports each evaluation loss to the Optuna trial and stops the run when the pruner says so."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None
        self.reported: set[int] = set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(OBJECTIVE)
        if value is None or self.pruned_at is not None or state.global_step in self.reported:
            return control  # the final evaluation repeats the last step's: reported once
        self.reported.add(state.global_step)
        self.trial.report(float(value), state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True
        return control


@dataclass
class SweepResult:
    """A sweep's table and best trial.

    Attributes:
        sweep_dir: where the study, the trials and the results are.
        rows: one dict per trial (see :func:`forge.tune.results.trial_rows`).
        best: the best completed trial's row, or None.
        ran: trials this call ran (a resumed sweep runs only the missing ones).
        keys: the searched preset keys.
    """

    sweep_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    ran: int = 0
    keys: list[str] = field(default_factory=list)


def _counted(trial: Any) -> bool:
    """A trial that is done: completed, pruned, or failed on a mistake forge reported (not interrupted)."""
    return trial.state.name in ("COMPLETE", "PRUNED") or (trial.state.name == "FAIL" and "error" in trial.user_attrs)


def _open_study(optuna: Any, sweep_dir: Path, space: dict[str, Param], preset: str, seed: int, pruner: Any) -> Any:
    storage = f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"
    described = {k: p.describe() for k, p in space.items()}
    existing = (sweep_dir / STUDY_FILE).is_file()
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage) if existing else None
    if study is not None and study.user_attrs.get("space") != described:
        raise ForgeError(f"{sweep_dir}: the study there searched another space ({study.user_attrs.get('space')}); "
                         "restore that space file or choose another --output-dir")
    # A fresh random stream on every resume, so a continued study never redraws its first values.
    sampler = optuna.samplers.TPESampler(seed=seed + (len(study.trials) if study is not None else 0))
    pruner = pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=2)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize",
                                sampler=sampler, pruner=pruner)
    if not existing:
        study.set_user_attr("space", described)
        study.set_user_attr("preset", preset)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Left RUNNING by a process that was killed: it will never finish.
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def sweep(preset: str, space_path: str | Path, trials: int, sweep_dir: str | Path | None = None,
          overrides: dict[str, Any] | None = None, seed: int = 0, pruner: Any = None) -> SweepResult:
    """Search the space with Optuna until the study holds ``trials`` finished trials.

    Args:
        preset: a shipped preset name or a YAML file (as for ``forge train``).
        space_path: the search space file (see :mod:`forge.tune.space`).
        trials: finished trials the study should hold (a rerun continues towards it).
        sweep_dir: the study, trials and results; default ``outputs/sweep-PRESET``.
        overrides: preset overrides every trial gets (``--set``, ``--model``, ...).
        seed: seed of the sampler.
        pruner: an Optuna pruner; default ``MedianPruner(n_startup_trials=2)``.

    Returns:
        A :class:`SweepResult`; ``SWEEP_DIR/results.csv`` and ``report.html`` hold the table.

    Raises:
        ForgeError: optuna is missing, or a problem in the space file (one line per key),
            before anything trains.
    """
    from forge.config.loader import load_preset
    from forge.recipes import runner

    if trials < 1:
        raise ForgeError(f"--trials: expected a positive number, got {trials}")
    optuna = require_optuna()
    overrides = dict(overrides or {})
    base = load_preset(preset, overrides)
    space = load_space(space_path, preset, overrides)
    out = Path(sweep_dir or f"outputs/sweep-{base.name}")
    if not has_eval(base.data):
        note(f"sweep: the preset has no evaluation set; holding out data.eval_fraction={EVAL_FRACTION} for the "
             "objective (eval_loss)")
        overrides["data.eval_fraction"] = EVAL_FRACTION
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(optuna, out, space, preset, seed, pruner)
    keys = list(space)
    done = sum(_counted(t) for t in study.trials)
    if done:
        note(f"sweep: continuing the study in {out}: {done} of {trials} trials done")

    def objective(trial: Any) -> float:
        values = {k: p.suggest(trial) for k, p in space.items()}
        trial_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("output_dir", str(trial_dir))
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        note(f"sweep: trial {trial.number} ({study_done() + 1} of {trials}): {shown}")
        started = time.perf_counter()
        pruning = PruneOnEval(trial)
        try:
            run = load_preset(preset, {**overrides, **values, "training.output_dir": str(trial_dir)})
            result = runner.train(run, overwrite=True, callbacks=[pruning])
            metrics = result.trainer.evaluate() if pruning.pruned_at is None else {}
        except ForgeError as err:
            trial.set_user_attr("error", str(err).splitlines()[0])
            raise
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("train_loss", result.metrics.get("train_loss"))
        trial.set_user_attr("steps", result.trainer.state.global_step)
        del result
        _free()
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned", f"pruned at step {pruning.pruned_at}")
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        return float(metrics[OBJECTIVE])

    def study_done() -> int:
        return sum(_counted(t) for t in study.trials)

    def record(study: Any, trial: Any) -> None:
        write_results(trial_rows(study, keys), keys, out)

    ran = 0
    try:
        while study_done() < trials:
            before = len(study.trials)
            study.optimize(objective, n_trials=1, catch=(ForgeError,), callbacks=[record])
            ran += len(study.trials) - before
    finally:
        write_results(trial_rows(study, keys), keys, out)
    rows = trial_rows(study, keys)
    return SweepResult(sweep_dir=out, rows=rows, best=best_row(rows), ran=ran, keys=keys)


def _free() -> None:
    """Release the trial's model before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
