"""What every forge feature shares, defined once: wrapper-proof model access
(:mod:`~forge.core.unwrap`), layer discovery, the one grouper (:mod:`~forge.core.discovery`),
distributed helpers (:mod:`~forge.core.distributed`), the one memory model of autotune and
``suggest_freeze`` (:mod:`~forge.core.memory`), file names and atomic writes (:mod:`~forge.core.paths`,
:mod:`~forge.core.io`), finding the running Trainer (:mod:`~forge.core.trainer_lookup`) and
one-line notes to the user (:mod:`~forge.core.console`).

Nothing here imports a feature package, so every feature can build on it.
"""
