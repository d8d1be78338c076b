"""Export the encoder of a run or checkpoint: `python tools/export.py --source runs/<run>/checkpoints/step_X --out DIR`.

Writes DIR/model.safetensors (timm key names) + timm's DIR/config.json + DIR/selfsup.json, as a finished run's encoder/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.export import load_encoder, save_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", required=True, help="run directory, checkpoint directory or encoder directory")
    parser.add_argument("--out", required=True, help="directory to write the encoder to")
    args = parser.parse_args(argv)
    encoder, meta = load_encoder(args.source)
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "backbone", "timm", "embed_dim", "patch_size")}
    out = save_encoder(encoder, args.out, **extra)
    print(json.dumps({"encoder": str(out), "backbone": meta["backbone"]["name"], "source": str(args.source)}))
    return out


if __name__ == "__main__":
    main()
