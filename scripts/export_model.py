"""Copy the files a user needs from a training run folder into a model folder.

    python scripts/export_model.py RUN_DIR DEST_DIR [--dtype bfloat16|float32]

The run keeps float32 weights (exact resume); a shipped model may store them
as bfloat16 to halve its size. The resume state (training_state.pt) stays behind.
"""

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from llada.checkpoint import INDEX_FILE, save_weights
from llada.train import STATE_FILE

FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "train_args.json", "train_log.csv", "data.json"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("dest")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    args = parser.parse_args()
    run, dest = Path(args.run), Path(args.dest)
    # Everything is checked before the first write: a refused export leaves both folders as they were.
    for name in ["model.safetensors"] + FILES:
        if not (run / name).is_file():
            parser.error(f"run: {run} has no {name}; expected a folder written by llada train")
    if dest.exists() and not dest.is_dir():
        parser.error(f"dest: {dest} is not a folder")
    if dest.resolve() == run.resolve() or (dest.exists() and dest.samefile(run)):
        # The export would replace the run's float32 weights, which its resume state was saved with.
        parser.error(f"dest: {dest} is the run folder itself; export into another folder")
    if (dest / STATE_FILE).exists():
        parser.error(f"dest: {dest} holds {STATE_FILE} (a training run); export into another folder")
    if (dest / INDEX_FILE).exists():
        # model.safetensors beside a sharded model's index: no loader could tell which weights are the model's.
        parser.error(f"dest: {dest} holds {INDEX_FILE} (a sharded model); export into another folder")
    dest.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    weights = load_file(run / "model.safetensors")
    # save_weights, not safetensors' own save: that one makes the file readable by its owner only.
    save_weights({k: v.to(dtype).contiguous() for k, v in weights.items()}, dest / "model.safetensors")
    for name in FILES:
        shutil.copy(run / name, dest / name)
    print(f"exported {run} -> {dest} ({args.dtype})")


if __name__ == "__main__":
    main()
