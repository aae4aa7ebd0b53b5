"""Training monitor: per-block gradient analytics and anomaly handling at near-zero cost.

Add it to any Trainer (TRL trainers included); its metrics go to every ``report_to`` tracker:

    from forge.monitor import GradientMonitor
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradientMonitor()])
    trainer.train()  # warns, skips or stops on bad steps; writes output_dir/monitor_summary.json

Or drive it from a plain PyTorch loop: ``monitor.attach(model)``, then ``monitor.step(optimizer,
loss=loss)`` in place of ``optimizer.step()``. See ``docs/monitor.md`` for every metric.

Inside: ``stats`` (on-device gradient and weight statistics), ``detect`` (anomaly detection),
``core`` (the per-step record and verdict), ``summary`` (metrics and the JSON summary),
``trainer`` (the glue to a running Trainer), ``callback`` and ``config``.
"""

from forge.monitor.callback import GradientMonitor, from_preset
from forge.monitor.config import MonitorConfig
from forge.monitor.detect import Anomaly, GradientAnomalyError

__all__ = ["Anomaly", "GradientAnomalyError", "GradientMonitor", "MonitorConfig", "from_preset"]
