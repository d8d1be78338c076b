"""Weighted kNN top-1/top-5 of a frozen encoder: `python tools/knn.py --encoder runs/<run>/encoder --dataset fashion_mnist`.

Prints a final JSON line {"top1": ..., "top5": ...}; k=200, cosine, temperature 0.1 by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from selfsup.builders import build_labelled_pair  # noqa: E402
from selfsup.evaluation import extract_features, knn_evaluate  # noqa: E402
from selfsup.export import load_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoder", required=True, help="exported encoder dir, run dir or checkpoint dir")
    parser.add_argument("--dataset", default=None, help="labelled dataset (default: the one it was pretrained on)")
    parser.add_argument("--root", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-train", type=int, default=None, help="use a fixed subset of the train split")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--output", default=None, help="JSON result file (default: beside the encoder)")
    args = parser.parse_args(argv)

    encoder, meta = load_encoder(args.encoder)
    data_meta = meta.get("data", {})
    dataset = args.dataset or data_meta.get("dataset")
    if dataset is None:
        parser.error("--dataset is required: the encoder does not record what it was trained on")
    image_size = args.image_size or data_meta.get("image_size", 32)
    in_chans = data_meta.get("in_chans", meta["backbone"].get("kwargs", {}).get("in_chans", 3))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder.to(device)
    train_set, test_set = build_labelled_pair(
        dataset, root=args.root, image_size=image_size, in_chans=in_chans,
        max_train=args.max_train, max_test=args.max_test,
    )
    feats = []
    for ds in (train_set, test_set):
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
        feats.append(extract_features(encoder, loader, device))
    (train_f, train_y), (test_f, test_y) = feats
    result = knn_evaluate(train_f, train_y, test_f, test_y, k=args.k, temperature=args.temperature)
    result = {**result, "k": args.k, "temperature": args.temperature, "dataset": dataset,
              "encoder": str(args.encoder), "train_size": len(train_y), "test_size": len(test_y)}
    output = Path(args.output) if args.output else _default_output(Path(args.encoder))
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


def _default_output(encoder: Path) -> Path:
    return (encoder if encoder.is_dir() else encoder.parent) / "knn.json"


if __name__ == "__main__":
    main()
