"""Tiny random checkpoints in the real folder format, shared by the model,
sampler and CLI tests."""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from llada.checkpoint import write_random_checkpoint

# What the published LLaDA folders' config.json adds: their own modelling
# code, for transformers' trust_remote_code (llada reads none of it).
AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}

TINY = dict(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=80, vocab_size=272)

SHAPES = {
    "mha": dict(TINY, n_kv_heads=4),
    "gqa": dict(TINY, n_kv_heads=2),
}


def make_checkpoint(folder: Path, seed: int = 0, boost_stop_tokens: float = 0.0, **overrides) -> Path:
    """Write a tiny random checkpoint, its config.json naming modelling code
    as the published ones do; ``boost_stop_tokens`` > 0 scales the LM
    head rows of EOS and EoT up so that random weights predict them often
    (otherwise EOS-specific behaviour would go untested)."""
    cfg = dict(TINY, **overrides)
    path = write_random_checkpoint(folder, cfg, seed=seed)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, auto_map=AUTO_MAP), indent=2))
    if boost_stop_tokens:
        file = str(path / "model.safetensors")
        weights = load_file(file)
        head = weights["model.transformer.ff_out.weight"]
        top = cfg["vocab_size"] - 1  # the writer's layout: bos, eos, eot, mask at the top
        for token in (top - 2, top - 1):
            head[token] = head[token] * boost_stop_tokens
        save_file(weights, file, metadata={"format": "pt"})
    return path
