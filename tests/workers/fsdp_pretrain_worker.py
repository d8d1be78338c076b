"""pretrain.py in 2 real CPU processes with MODE=ddp or MODE=fsdp (FSDP2 through Accelerate's prepare).
Args: MODE CONFIG.

Accelerate 1.15 turns FSDP on only for GPU-class devices (accelerate/state.py, AcceleratorState.__init__:
the FSDP switch sits in the branch for MULTI_GPU / NPU / XPU ... and never sees MULTI_CPU), while torch 2.14's
FSDP2 itself runs on CPU tensors over gloo. So for MODE=fsdp this worker sets the state Accelerate would set on
GPUs (distributed_type FSDP and the plugin configs/accelerate/fsdp.yaml describes); everything after that,
`prepare` wrapping the model with fully_shard included, is Accelerate's and selfsup's own code.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import selfsup.engine
from selfsup.cli import pretrain

MODE, CONFIG = sys.argv[1], sys.argv[2]
_make_accelerator = selfsup.engine.make_accelerator


def make_accelerator(cfg, run_dir=None):
    accelerator = _make_accelerator(cfg, run_dir)
    assert accelerator.num_processes == 2 and dist.get_world_size() == 2, "expected 2 processes"
    if MODE == "fsdp":
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # the two singletons keep their own copy
    prepare = accelerator.prepare

    def reporting_prepare(*objects):
        out = prepare(*objects)
        model = out[0] if isinstance(out, (tuple, list)) else out
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        full = sum(p.numel() for p in model.parameters())
        print(f"[worker] rank {accelerator.process_index} mode {MODE}: {'/'.join(kinds)} parameters, "
              f"{local} of {full} values held here", flush=True)
        return out

    accelerator.prepare = reporting_prepare
    return accelerator


selfsup.engine.make_accelerator = make_accelerator
pretrain.main(["--config", CONFIG])
