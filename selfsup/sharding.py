"""FSDP (through Accelerate's FSDP2): what the engine needs beyond `prepare` when parameters are sharded.

With FSDP2 (`torch.distributed.fsdp.fully_shard`, which `accelerator.prepare` applies per the launch config,
configs/accelerate/fsdp.yaml) every parameter of the method is a DTensor holding this process's shard: the
momentum encoders too, so their EMA (`torch._foreach_lerp_` in momentum.py) updates local shards against local
shards. Nothing can run a forward on one process alone, so evaluation and export work on an unsharded copy
made before `prepare`, into which the full weights are gathered: a collective that every process enters
(torch's `get_model_state_dict(full_state_dict=True, cpu_offload=True)`), the full tensors landing on the
main process only.
"""

from __future__ import annotations

import copy
import os

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

__all__ = ["is_sharded", "unsharded_copy", "gather_full_model", "fsdp_requested_but_off"]


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def fsdp_requested_but_off(accelerator: Accelerator) -> bool:
    """The launch asked for FSDP but Accelerate runs something else: Accelerate 1.15 turns FSDP on only for
    GPU-class devices (accelerate/state.py, AcceleratorState.__init__), so on CPU processes it is plain DDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not is_sharded(accelerator)


def unsharded_copy(model: nn.Module, accelerator: Accelerator) -> nn.Module | None:
    """A CPU copy of `model` to gather full weights into, on the main process of a sharded run; else None."""
    if not is_sharded(accelerator) or not accelerator.is_main_process:
        return None
    return copy.deepcopy(model).cpu()


def gather_full_model(accelerator: Accelerator, model: nn.Module, shadow: nn.Module | None) -> nn.Module | None:
    """The model with full weights: `model` itself when not sharded; under FSDP the `shadow` copy holding the
    gathered weights on the main process and None on the others. Collective: every process must call it."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    shadow.load_state_dict(state)
    return shadow
