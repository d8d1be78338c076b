"""FSDP2 in 2 real CPU processes (gloo): MAE and MoCo v3 (momentum encoder sharded like the online one) train
to the same losses as DDP, and the export gathers the shards into the same model.safetensors, which plain timm
loads. See tests/workers/fsdp_pretrain_worker.py for why FSDP has to be switched on by hand on CPU."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_losses, tiny_config_dict, write_config
from tests.multiproc import WORKERS_DIR, run_workers

TINY_VIT = {"name": "vit_tiny_patch4", "kwargs": {"img_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}}
METHODS = {
    "mae": {"name": "mae", "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    "moco_v3": {"name": "moco", "variant": "v3", "proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_matches_ddp_and_exports_what_timm_loads(tmp_path, method):
    runs = {}
    for mode in ("ddp", "fsdp"):
        cfg = tiny_config_dict(tmp_path, method=METHODS[method], backbone=TINY_VIT,
                               data={"batch_size": 8, "num_samples": 64},
                               optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
                               train={"max_steps": 4, "checkpoint_every_steps": 2, "run_name": mode, "precision": "no"})
        proc = run_workers(WORKERS_DIR / "fsdp_pretrain_worker.py", mode, write_config(tmp_path, cfg, f"{mode}.yaml"),
                           timeout=300)
        out = proc.stdout + proc.stderr
        assert "world size 2" in out, out
        if mode == "fsdp":
            for rank in (0, 1):
                line = next(l for l in out.splitlines() if l.startswith(f"[worker] rank {rank} mode fsdp"))
                held, total = (int(w) for w in line.split(": ")[1].split()[2:5:2])
                assert "DTensor parameters" in line and held < 0.6 * total, line  # about half here, half there
        runs[mode] = tmp_path / "runs" / mode
    ddp, fsdp = read_losses(runs["ddp"]), read_losses(runs["fsdp"])
    assert list(ddp) == list(fsdp) == [1, 2, 3, 4]
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-4, abs=1e-5), (step, ddp, fsdp)
    weights = {mode: load_file(str(run / "encoder" / "model.safetensors")) for mode, run in runs.items()}
    assert weights["ddp"].keys() == weights["fsdp"].keys()
    for key in weights["ddp"]:
        torch.testing.assert_close(weights["fsdp"][key], weights["ddp"][key], rtol=1e-4, atol=1e-5)
    model = timm.create_model(f"local-dir:{runs['fsdp'] / 'encoder'}", pretrained=True).eval()
    reference = timm.create_model(f"local-dir:{runs['ddp'] / 'encoder'}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert json.loads((runs["fsdp"] / "summary.json").read_text())["steps"] == 4


def test_the_fsdp_launch_config_is_one_accelerate_reads_as_fsdp2():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Block"
    block = type(timm.create_model("vit_tiny_patch16_224", device="meta").blocks[0]).__name__
    assert block == "Block"  # the class the config wraps is timm's ViT block
