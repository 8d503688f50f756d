"""The `llada` command: generate (plain, chat, --show-steps) and
make-random-checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada
from llada.cli import decode_answer, main

from checkpoints import make_checkpoint
from naive_llada import NaiveLLaDA, naive_generate

ARGS = ["--steps", "8", "--gen-length", "16", "--block-length", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"), seed=2)


def oracle_answer(folder, text):
    """What the CLI must print: the oracle's greedy answer, decoded."""
    tok = llada.load_tokenizer(folder)
    oracle = NaiveLLaDA(folder)
    cfg = llada.load_config(folder)
    prompt = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = naive_generate(oracle.forward, prompt, steps=8, gen_length=16, block_length=8,
                         mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, eot_id=oracle.eot_id)
    return decode_answer(tok, out[0, prompt.shape[1]:].tolist(), {cfg.eos_token_id, cfg.eot_token_id})


def test_generate_prints_the_answer(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), *ARGS, "Hello there"]) == 0
    assert capsys.readouterr().out == oracle_answer(checkpoint, "Hello there") + "\n"


def test_generate_chat_applies_the_template(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--chat", *ARGS, "Hi"]) == 0
    chat = llada.load_tokenizer(checkpoint).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert capsys.readouterr().out == oracle_answer(checkpoint, chat) + "\n"


def test_show_steps_without_a_terminal(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--show-steps", *ARGS, "Hey"]) == 0
    *steps, answer = capsys.readouterr().out.split("\n", 8)
    assert [line.split(":")[0] for line in steps] == [f"step {i}/8" for i in range(1, 9)]
    assert steps[0].count("_") >= 14  # 2 of 16 positions unmasked by step 1
    assert answer == oracle_answer(checkpoint, "Hey") + "\n"


def test_default_model_is_the_bundled_one(capsys):
    assert main(["generate", "--steps", "8", "--gen-length", "8", "--block-length", "8", "def f("]) == 0
    assert capsys.readouterr().out.strip()


def test_infill_and_stream_commands(checkpoint, capsys):
    assert main(["infill", "--model", str(checkpoint), "--prefix", "ab", "--suffix", "yz",
                 "--length", "4", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ab") and captured.out.rstrip("\n").endswith("yz")
    assert "forwards 4" in captured.err
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--stream", "--policy", "fast", "x"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["infill", "--model", str(checkpoint), "--length", "0"])
    assert e.value.code == 2 and "--length" in capsys.readouterr().err


def test_bad_arguments(checkpoint, capsys, tmp_path):
    assert main(["generate", "--model", str(checkpoint), "--gen-length", "20", "--block-length", "8", "x"]) == 2
    assert "block_length" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_make_random_checkpoint(tmp_path, capsys):
    assert main(["make-random-checkpoint", str(tmp_path / "ck"), "--seed", "3", "--shards", "2"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model.safetensors.index.json").is_file()
    model = llada.load_model(folder, device="cpu")
    assert model.config.d_model == 64
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_entry_point_subprocess(checkpoint):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-m", "llada.cli", "generate", "--model", str(checkpoint), *ARGS, "Hello there"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == oracle_answer(checkpoint, "Hello there") + "\n"


def test_policy_flags_build_the_policy():
    from llada.cli import build_parser, policy_from_arguments

    def policy(*flags):
        return policy_from_arguments(build_parser().parse_args(["generate", "hi", *flags]))

    assert policy() == llada.DecodePolicy()
    fast = policy("--policy", "fast", "--threshold", "0.7", "--early-stop")
    assert fast == llada.DecodePolicy.fast(threshold=0.7, early_stop=True)
    assert policy("--cache", "dual").cuda_graph  # on unless turned off
    assert not policy("--cache", "dual", "--no-cuda-graph").cuda_graph
