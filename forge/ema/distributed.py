"""What :mod:`forge.ema` supports under sharding (the shared plumbing is :mod:`forge.core.distributed`).

Under DDP and DeepSpeed ZeRO-1/2 every rank holds full, identical parameters, so the
EMA needs no communication at all. Under FSDP2 (``fully_shard``) parameters are ``DTensor``s,
and under ZeRO-3 each rank holds a flat partition (``ds_tensor``); the EMA keeps only this
rank's part and gathers full tensors for saving. FSDP1 is refused: its flat parameters mix
many tensors into one rank-local buffer.
"""

from __future__ import annotations

from torch import nn


def check_supported(model: nn.Module) -> None:
    """Refuse layouts whose parameters are not what they look like, instead of averaging garbage.

    Raises:
        NotImplementedError: for FSDP1 flat parameters.
    """
    for module in model.modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise NotImplementedError(
                "forge.ema supports FSDP2 (torch.distributed.fsdp.fully_shard, accelerate "
                "fsdp_version: 2); FSDP1 flattens parameters, so the EMA would track rank-local "
                "flat buffers. Switch to fsdp_version 2."
            )
