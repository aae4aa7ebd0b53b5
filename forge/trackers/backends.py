"""The three tracker callbacks of :mod:`forge.trackers`, each extending the transformers one.

Each class subclasses the stock integration callback and keeps its behaviour (the Trainer's
scalars under the names users know, its config logging, W&B's model logging); it adds the run
options of its spec, forge figures under their own ``forge/...`` names, gradient histograms,
the redacted preset, and the failure guard of :class:`forge.trackers.base.TrackerCore`.
Import them from :mod:`forge.trackers`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

from transformers.integrations.integration_utils import (
    MLflowCallback,
    TensorBoardCallback,
    WandbCallback,
    WandbLogModel,
)

from forge.core.io import atomic_write_text
from forge.core.paths import PRESET_FILE
from forge.errors import ForgeError
from forge.trackers.base import (
    HISTOGRAM_PREFIX,
    HistogramTap,
    TrackerCore,
    redacted_args,
    require,
    split_forge,
)
from forge.trackers.redact import redact_text
from forge.trackers.specs import MLflowSpec, TensorBoardSpec, WandbSpec


def _spec(cls: type, spec: Any, overrides: dict[str, Any]) -> Any:
    return dataclasses.replace(spec if spec is not None else cls(), **overrides)


def _preset_dict(core: TrackerCore) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(core.preset_yaml) if core.preset_yaml else None
    return data if isinstance(data, dict) else {}


class ForgeTensorBoardCallback(TensorBoardCallback):
    """transformers' ``TensorBoardCallback`` plus forge figures, histograms and the preset.

    Trainer scalars keep their stock names (``train/loss``, ``eval/loss``); forge figures keep
    theirs (``forge/grad_norm/layer_07``); per-block gradient histograms land as
    ``forge/grad_hist/<block>`` every ``histogram_every`` steps; the redacted preset is the
    text ``forge/preset``. Events go to ``logging_dir`` (default ``output_dir/runs/<run_name or
    time_host>``). Add it to ``callbacks`` with ``report_to`` not naming ``tensorboard``.

    Args:
        spec: a :class:`~forge.trackers.TensorBoardSpec` (defaults if None).
        preset_yaml: the resolved preset to store with the run (secrets are redacted).
        **overrides: fields of the spec, e.g. ``histogram_every=10``.

    Example:
        >>> cb = ForgeTensorBoardCallback(histogram_every=10)
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[cb])  # doctest: +SKIP
    """

    def __init__(self, spec: TensorBoardSpec | None = None, preset_yaml: str | None = None,
                 **overrides: Any):
        require("tensorboard")
        super().__init__()
        spec = _spec(TensorBoardSpec, spec, overrides)
        self.forge = TrackerCore("tensorboard", spec, preset_yaml)
        self.tap = HistogramTap(self.forge)
        if self.forge.spec.logging_dir:
            self.logging_dir = os.path.expanduser(self.forge.spec.logging_dir)

    def _begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.logging_dir is None and self.forge.spec.run_name:
            self.logging_dir = os.path.join(args.output_dir, "runs", self.forge.spec.run_name)
        super().on_train_begin(redacted_args(args), state, control, **kwargs)
        if self.tb_writer is not None and self.forge.preset_yaml:
            # Indented: TensorBoard renders text as markdown, and this keeps YAML verbatim.
            text = "".join("    " + line for line in self.forge.preset_yaml.splitlines(True))
            self.tb_writer.add_text("forge/preset", text, state.global_step)
            self.tb_writer.flush()

    def _log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        forge, rest = split_forge(logs)
        super().on_log(args, state, control, logs=rest, **kwargs)
        if self.tb_writer is None:
            return
        for key, value in forge.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                continue
            if isinstance(value, str):
                self.tb_writer.add_text(key, redact_text(value), state.global_step)
            else:
                self.tb_writer.add_scalar(key, value, state.global_step)
        self.tb_writer.flush()

    def _histograms(self, args, state, hists):
        if self.tb_writer is None:
            self._init_summary_writer(args)
        step = state.global_step + 1  # the optimizer step these gradients are about to make
        for block, h in hists.items():
            self.tb_writer.add_histogram_raw(
                HISTOGRAM_PREFIX + block, min=h["min"], max=h["max"], num=h["num"], sum=h["sum"],
                sum_squares=h["sum_squares"], bucket_limits=h["edges"][1:],
                bucket_counts=h["counts"], global_step=step)

    def _close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tap.begin()
        self.forge.guard("on_train_begin", self._begin, args, state, control,
                         on_failure=self._close, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.forge.guard("on_log", self._log, args, state, control, logs=logs,
                         on_failure=self._close, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        hists = self.tap.take(state, model)  # every rank: a collective under sharding
        if hists:
            self.forge.guard("on_pre_optimizer_step", self._histograms, args, state, hists,
                             on_failure=self._close)

    def on_train_end(self, args, state, control, **kwargs):
        self.tap.end()
        self.forge.guard("on_train_end", super().on_train_end, args, state, control, **kwargs)


class ForgeWandbCallback(WandbCallback):
    """transformers' ``WandbCallback`` plus run options, forge figures, histograms and the preset.

    The run starts with the spec's project, entity, name, group, tags and mode (``offline``
    works without an account); the redacted preset goes into the run config (``forge_preset``)
    and the run files (``forge_preset.yaml``). ``log_model: true`` uploads the final model (the
    adapter under PEFT) through the stock ``WANDB_LOG_MODEL=end`` path. As with the stock
    callback, the run is left open at the end of training (``wandb.finish()`` closes it).

    Args:
        spec: a :class:`forge.trackers.WandbSpec` (defaults if None).
        preset_yaml: the resolved preset to store with the run (secrets are redacted).
        **overrides: fields of the spec, e.g. ``project="my-project", mode="offline"``.

    Example:
        >>> cb = ForgeWandbCallback(project="sft-sweeps", mode="offline")  # doctest: +SKIP
    """

    def __init__(self, spec: WandbSpec | None = None, preset_yaml: str | None = None,
                 **overrides: Any):
        require("wandb")
        super().__init__()
        self.forge = TrackerCore("wandb", _spec(WandbSpec, spec, overrides), preset_yaml)
        self.tap = HistogramTap(self.forge)
        if self.forge.spec.log_model:
            self._log_model = WandbLogModel.END

    def setup(self, args, state, model, **kwargs):
        spec = self.forge.spec
        if state.is_world_process_zero and self._wandb.run is None:
            init = {"project": spec.project or os.getenv("WANDB_PROJECT", "huggingface"),
                    "entity": spec.entity, "group": spec.group, "tags": list(spec.tags) or None,
                    "name": spec.run_name or args.run_name, "mode": spec.mode}
            self._wandb.init(**{k: v for k, v in init.items() if v is not None})
        super().setup(redacted_args(args), state, model, **kwargs)
        if state.is_world_process_zero and self.forge.preset_yaml and self._wandb.run is not None:
            self._wandb.config.update({"forge_preset": _preset_dict(self.forge)},
                                      allow_val_change=True)
            path = os.path.join(self._wandb.run.dir, PRESET_FILE)
            atomic_write_text(path, self.forge.preset_yaml)
            self._wandb.save(path, base_path=self._wandb.run.dir, policy="now")

    def _log(self, args, state, control, model=None, logs=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if state.is_world_process_zero and logs:
            forge, rest = split_forge(logs)
            if forge:  # same history row as the stock keys, which the call below commits
                forge = {k: redact_text(v) if isinstance(v, str) else v for k, v in forge.items()}
                self._wandb.log(forge, commit=False)
            logs = rest
        super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    def _histograms(self, args, state, taken):
        if not self._initialized:
            return
        import numpy as np

        hists = {HISTOGRAM_PREFIX + block: self._wandb.Histogram(
                     np_histogram=(np.asarray(h["counts"]), np.asarray(h["edges"])))
                 for block, h in taken.items()}
        if hists:
            self._wandb.log({**hists, "train/global_step": state.global_step + 1})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tap.begin()
        self.forge.guard("on_train_begin", super().on_train_begin, args, state, control,
                         model=model, **kwargs)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        self.forge.guard("on_log", self._log, args, state, control, model=model, logs=logs,
                         **kwargs)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        hists = self.tap.take(state, model)  # every rank: a collective under sharding
        if hists:
            self.forge.guard("on_pre_optimizer_step", self._histograms, args, state, hists)

    def on_save(self, args, state, control, **kwargs):
        self.forge.guard("on_save", super().on_save, args, state, control, **kwargs)

    def on_predict(self, args, state, control, metrics, **kwargs):
        self.forge.guard("on_predict", super().on_predict, args, state, control, metrics,
                         **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.tap.end()
        self.forge.guard("on_train_end", super().on_train_end, args, state, control, **kwargs)


class ForgeMLflowCallback(MLflowCallback):
    """transformers' ``MLflowCallback`` plus run options, forge figures and the preset.

    The spec's ``tracking_uri`` (e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``),
    ``experiment_name``, ``run_name`` and ``tags`` apply to the run it starts; the redacted
    preset is logged as ``forge.<section>.<key>`` params and as the artifact
    ``forge_preset.yaml``; ``log_model: true`` logs the final model (the adapter under PEFT)
    as artifacts under ``model/``. Metrics are logged synchronously, so an unreachable server
    is noticed at once (one warning) instead of by a background thread on every step.
    MLflow has no histograms. Honours ``MLFLOW_RUN_ID`` and ``MLFLOW_NESTED_RUN`` as the stock
    callback does.

    Args:
        spec: a :class:`forge.trackers.MLflowSpec` (defaults if None).
        preset_yaml: the resolved preset to store with the run (secrets are redacted).
        **overrides: fields of the spec, e.g. ``tracking_uri="sqlite:///mlflow.db"``.

    Example:
        >>> cb = ForgeMLflowCallback(tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
    """

    def __init__(self, spec: MLflowSpec | None = None, preset_yaml: str | None = None,
                 **overrides: Any):
        require("mlflow")
        self._auto_end_run = False  # read by the stock __del__, even if __init__ fails
        if os.getenv("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":
            raise ForgeError("trackers: mlflow is turned off by DISABLE_MLFLOW_INTEGRATION=TRUE "
                             "in the environment; unset it to log to MLflow")
        super().__init__()
        self.forge = TrackerCore("mlflow", _spec(MLflowSpec, spec, overrides), preset_yaml)

    def setup(self, args, state, model):
        mlflow, spec = self._ml_flow, self.forge.spec
        tags = spec.tags if isinstance(spec.tags, dict) else {t: "" for t in spec.tags}
        started = False
        if state.is_world_process_zero:
            if spec.tracking_uri:
                mlflow.set_tracking_uri(spec.tracking_uri)
            env_driven = os.getenv("MLFLOW_RUN_ID") or os.getenv(
                "MLFLOW_NESTED_RUN", "").upper() in ("1", "TRUE", "YES", "ON")
            if mlflow.active_run() is None and not env_driven:
                experiment = spec.experiment_name or os.getenv("MLFLOW_EXPERIMENT_NAME")
                if experiment:
                    mlflow.set_experiment(experiment)
                mlflow.start_run(run_name=spec.run_name or args.run_name, tags=tags or None)
                started = True
        super().setup(redacted_args(args), state, model)
        self._async_log = False  # see the class docstring
        if not state.is_world_process_zero:
            return
        if started:
            self._auto_end_run = True
        elif tags:
            mlflow.set_tags(tags)
        if self.forge.preset_yaml:
            params = _flatten(_preset_dict(self.forge), "forge.")
            limit = self._MAX_PARAM_VAL_LENGTH
            items = [(k, str(v)[:limit]) for k, v in params.items()]
            for i in range(0, len(items), self._MAX_PARAMS_TAGS_PER_BATCH):
                mlflow.log_params(dict(items[i:i + self._MAX_PARAMS_TAGS_PER_BATCH]))
            mlflow.log_text(self.forge.preset_yaml, PRESET_FILE)

    def _log(self, args, state, control, logs=None, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if state.is_world_process_zero and logs:
            # MLflow metrics are numbers; a forge figure that is text becomes a tag.
            texts = {k: v for k, v in logs.items() if k.startswith("forge/") and isinstance(v, str)}
            if texts:
                self._ml_flow.set_tags({k: redact_text(v)[:5000] for k, v in texts.items()})
            logs = {k: v for k, v in logs.items() if k not in texts}
        super().on_log(args, state, control, logs, model=model, **kwargs)

    def _end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if (self.forge.spec.log_model and self._initialized and state.is_world_process_zero
                and model is not None):
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)  # PEFT models save the adapter only
                if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                    processing_class.save_pretrained(tmp)
                self._ml_flow.log_artifacts(tmp, artifact_path="model")
        super().on_train_end(args, state, control, **kwargs)

    def _abandon(self) -> None:
        # A broken backend cannot take the end-of-run status either; don't retry in __del__.
        self._auto_end_run = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.forge.guard("on_train_begin", super().on_train_begin, args, state, control,
                         model=model, on_failure=self._abandon, **kwargs)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self.forge.guard("on_log", self._log, args, state, control, logs=logs, model=model,
                         on_failure=self._abandon, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        self.forge.guard("on_save", super().on_save, args, state, control,
                         on_failure=self._abandon, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self.forge.guard("on_train_end", self._end, args, state, control,
                         on_failure=self._abandon, **kwargs)


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``{"training": {"lr": 1}}`` -> ``{"forge.training.lr": 1}`` (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


CALLBACKS: dict[str, type] = {"tensorboard": ForgeTensorBoardCallback, "wandb": ForgeWandbCallback,
                              "mlflow": ForgeMLflowCallback}
