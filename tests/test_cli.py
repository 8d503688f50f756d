"""The `llada` command: generate (plain, chat, --show-steps, a prompts
file), infill, stream and make-random-checkpoint."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada
from llada.cli import build_parser, main

from checkpoints import make_checkpoint
from naive_llada import NaiveLLaDA, naive_answers, naive_generate

ARGS = ["--steps", "8", "--gen-length", "16", "--block-length", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"), seed=2)


def oracle_answer(folder, text):
    """What the CLI must print: the oracle's greedy answer, decoded."""
    return oracle_batch_answers(folder, [text])[0]


def oracle_batch_answers(folder, texts):
    return naive_answers(folder, llada.load_tokenizer(folder), texts, steps=8, gen_length=16, block_length=8)


def oracle_infill(folder, prefix, suffix, length):
    """The oracle's greedy gap between ``prefix`` and ``suffix`` (one token per
    step, one block): its sampler fills the masks after the prefix while the
    forward sees the suffix after them; EOS/EoT dropped, decoded."""
    tok = llada.load_tokenizer(folder)
    oracle = NaiveLLaDA(folder)
    eos_id, mask_id = oracle.cfg["eos_token_id"], oracle.cfg["mask_token_id"]
    head, tail = (torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in (prefix, suffix))

    def forward(ids, attention_mask):
        return oracle.forward(torch.cat([ids, tail.expand(len(ids), -1)], 1))[:, :ids.shape[1]]

    out = naive_generate(forward, head, steps=length, gen_length=length, block_length=length,
                         mask_id=mask_id, eos_id=eos_id, eot_id=oracle.eot_id)
    gap = [t for t in out[0, head.shape[1]:].tolist() if t not in (eos_id, oracle.eot_id)]
    return tok.decode(gap, skip_special_tokens=True)


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


def test_prompts_file_answers_each_prompt_in_order(checkpoint, capsys, tmp_path):
    texts = ["Hello there, how are you today", "Hi", "A prompt\nof two lines", "ok"]
    lines = [json.dumps(texts[0]), json.dumps({"prompt": texts[1], "id": 7}), "",
             json.dumps(texts[2]), json.dumps(texts[3]), ""]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file",
                 str(tmp_path / "prompts.jsonl"), "--batch-size", "3", "--stats"]) == 0
    captured = capsys.readouterr()
    printed = [json.loads(line) for line in captured.out.splitlines()]
    assert [p["prompt"] for p in printed] == texts
    assert printed[1]["id"] == 7 and list(printed[1]) == ["prompt", "id", "answer"]  # other keys kept
    # Batches of three and one, each decoded together with left padding: the
    # three longest prompts (30, 21 and 2 tokens; "Hi" before "ok") first.
    longest = oracle_batch_answers(checkpoint, [texts[0], texts[2], texts[1]])
    expected = [longest[0], longest[2], longest[1], oracle_batch_answers(checkpoint, texts[3:])[0]]
    assert [p["answer"] for p in printed] == expected
    assert "forwards 16," in captured.err  # two batches of 8 forwards


def test_prompts_file_longer_than_a_window_keeps_every_prompt_in_order(checkpoint, capsys, tmp_path):
    from llada.cli import PROMPTS_FILE_WINDOW

    texts = [f"prompt {'x' * (i % 3)} {i}" for i in range(PROMPTS_FILE_WINDOW + 2)]  # two windows of batch 1
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(t) for t in texts), encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file",
                 str(tmp_path / "prompts.jsonl"), "--batch-size", "1"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{"prompt": t, "answer": oracle_answer(checkpoint, t)} for t in texts]


def test_prompts_file_copies_of_a_prompt_are_different_samples(checkpoint, capsys, tmp_path):
    # With --temperature and --seed, line i samples with noise key i: copies
    # of one prompt are different samples, and each line's answer is the
    # same for every --batch-size (and window of batches). The reference is
    # llada.generate's default keying: row i of a batch of copies.
    from llada.cli import PROMPTS_FILE_WINDOW

    count = PROMPTS_FILE_WINDOW + 2  # with --batch-size 1, two windows
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": "def f(x):", "sample": i})
                                                      for i in range(count)), encoding="utf-8")
    engine = llada.load(checkpoint, device="cpu")
    ids = torch.tensor([engine.encode("def f(x):")] * count)
    out = llada.generate(engine.model, ids, steps=8, gen_length=16, block_length=8, temperature=1.0, seed=0)
    expected = [engine.decode(row[ids.shape[1]:]) for row in out]
    assert len(set(expected)) == count
    for batch_size in ("1", "2", "8"):
        assert main(["generate", "--model", str(checkpoint), *ARGS, "--temperature", "1", "--seed", "0",
                     "--prompts-file", str(tmp_path / "prompts.jsonl"), "--batch-size", batch_size]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [p["sample"] for p in printed] == list(range(count))
        assert [p["answer"] for p in printed] == expected, batch_size


def test_prompts_file_shows_progress_on_a_terminal_when_the_answers_go_elsewhere(checkpoint, capsys, tmp_path,
                                                                                   monkeypatch):
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(t) for t in ["a", "bb", "ccc"]), encoding="utf-8")
    argv = ["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(tmp_path / "prompts.jsonl")]
    assert main(argv) == 0
    quiet = capsys.readouterr()
    assert "3/3" not in quiet.err and len(quiet.out.splitlines()) == 3
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    shown = capsys.readouterr()
    assert "3/3" in shown.err and shown.out == quiet.out


def test_system_message_and_conversations(checkpoint, capsys, tmp_path):
    tok = llada.load_tokenizer(checkpoint)
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."},
             {"role": "user", "content": "Again"}]
    chats = [tok.apply_chat_template([system, {"role": "user", "content": "Hey"}], add_generation_prompt=True,
                                     tokenize=False),
             tok.apply_chat_template([system] + turns, add_generation_prompt=True, tokenize=False)]
    assert main(["generate", "--model", str(checkpoint), "--chat", "--system", "Be brief.", *ARGS, "Hey"]) == 0
    assert capsys.readouterr().out == oracle_answer(checkpoint, chats[0]) + "\n"
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps("Hey") + "\n" + json.dumps({"messages": turns, "id": 3}) + "\n")
    assert main(["generate", "--model", str(checkpoint), "--chat", "--system", "Be brief.", *ARGS,
                 "--prompts-file", str(path)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    longest_first = oracle_batch_answers(checkpoint, chats[::-1])
    assert printed == [{"prompt": "Hey", "answer": longest_first[1]},
                       {"messages": turns, "id": 3, "answer": longest_first[0]}]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--system", "x", "Hi"], "--system: a system message needs --chat"),
    (["likelihood", "--system", "x", "--prompt", "a", "--answer", "b"], "--system: a system message needs --chat"),
])
def test_system_needs_chat(checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([*argv[:1], "--model", str(checkpoint), *argv[1:]])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "byte-order-mark"])
def test_prompts_file_dash_reads_standard_input(checkpoint, capsys, monkeypatch, tmp_path, bom):
    texts = ["Hello there", "Hi ☃"]
    lines = bom + "\r\n".join(json.dumps(t, ensure_ascii=False) for t in texts).encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="ascii"))
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", "-"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["prompt"] for p in printed] == texts
    assert [p["answer"] for p in printed] == oracle_batch_answers(checkpoint, texts)
    (tmp_path / "prompts.jsonl").write_bytes(lines)  # the same from a file
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(tmp_path / "prompts.jsonl")]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == printed


@pytest.mark.parametrize("content, flags, message", [
    ('"a"\n{"text": "b"}\n', [], "line 2: expected a JSON string"),
    ('{"prompt": "a", "messages": []}\n', [], 'line 1: has both "prompt" and "messages"'),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', [], '"messages" (a conversation) needs --chat'),
    ('{"messages": [{"role": "user"}]}\n', ["--chat"], "line 1: messages[0]: expected a message"),
    ('"a"\nnot json\n', [], "line 2: not JSON"),
    ('"a"\n{"prompt": "b", "answer": "c"}\n', [], 'line 2: has the key "answer"'),
    ('"a"\n{"prompt": "b", "id": "x\\ud800"}\n', [], "line 2: holds a lone surrogate escape"),
    ("\n\n", [], "holds no prompts"),
    (b"\xff\xfe", [], "not valid UTF-8 text"),
    ('"a"\n', ["--batch-size", "0"], "--batch-size: expected a positive int, got 0"),
    ('"a"\n', ["--stream"], "--show-steps and --stream follow one prompt, not --prompts-file"),
    ('"a"\n', ["also a prompt"], "not both"),
])
def test_prompts_file_bad_input(checkpoint, capsys, tmp_path, content, flags, message):
    path = tmp_path / "prompts.jsonl"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    try:
        code = main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(path), *flags])
    except SystemExit as e:  # argparse's errors
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_default_model_is_the_bundled_one(capsys):
    from llada.train import default_model_path

    assert main(["generate", "--steps", "8", "--gen-length", "8", "--block-length", "8", "--device", "cpu",
                 "def f("]) == 0
    folder = default_model_path()
    expected = naive_answers(folder, llada.load_tokenizer(folder), ["def f("], steps=8, gen_length=8, block_length=8)
    assert expected[0] and capsys.readouterr().out == expected[0] + "\n"


def test_infill_and_stream_commands(checkpoint, capsys):
    assert main(["infill", "--model", str(checkpoint), "--prefix", "ab", "--suffix", "yz",
                 "--length", "4", "--stats"]) == 0
    captured = capsys.readouterr()
    gap = oracle_infill(checkpoint, "ab", "yz", 4)
    assert gap and captured.out == "ab" + gap + "yz\n"
    assert "forwards 4," in captured.err
    # Streamed, the answer is the one printed at once (the same flags).
    fast = ["generate", "--model", str(checkpoint), *ARGS[2:], "--policy", "fast", "x"]
    assert main(fast) == 0
    whole = capsys.readouterr().out
    assert main([*fast, "--stream"]) == 0
    assert whole.strip() and capsys.readouterr().out == whole
    with pytest.raises(SystemExit) as e:
        main(["infill", "--model", str(checkpoint), "--length", "0"])
    assert e.value.code == 2 and "--length: expected a positive int, got 0" in capsys.readouterr().err
    # The engine's errors name the flags too.
    for flags, named in ((["--length", str(2**62)], "--length: text and gaps make"),
                         (["--prefix", "a <|mdm_mask|>", "--length", "4"], "--prefix: the text holds the mask token")):
        assert main(["infill", "--model", str(checkpoint), *flags]) == 2
        assert f"llada: error: {named}" in capsys.readouterr().err


def test_infill_takes_every_steps_count_llada_infill_takes(checkpoint, capsys):
    # --length 5 --block-length 2: 3 blocks of 2 positions, so llada.infill
    # takes up to 6 steps (its default here: one token per step in the
    # fullest block, the last block's one token costing one forward).
    base = ["infill", "--model", str(checkpoint), "--device", "cpu", "--prefix", "ab", "--suffix", "yz",
            "--length", "5", "--block-length", "2", "--stats"]
    assert main(base) == 0
    default = capsys.readouterr()
    assert "forwards 5," in default.err
    assert main([*base, "--steps", "6"]) == 0
    assert capsys.readouterr() == default
    assert main([*base, "--steps", "3"]) == 0
    assert "forwards 3," in capsys.readouterr().err
    assert _exit_code([*base, "--steps", "9"]) == 2
    assert ("--steps: expected a multiple of the number of blocks (3), at most 3 blocks of --block-length (6), "
            "got 9") in capsys.readouterr().err


@pytest.mark.parametrize("block_length", ["4", "5", "3000000000", str(2**40), str(10**20)])
def test_infill_block_longer_than_the_gap_is_the_gap(checkpoint, capsys, block_length):
    # The gap is one span of --length tokens: a longer block decodes it as
    # one block, whatever the flag's size (which no tensor is made of).
    base = ["infill", "--model", str(checkpoint), "--device", "cpu", "--prefix", "ab", "--suffix", "yz",
            "--length", "4", "--block-length", block_length, "--stats"]
    expected = "ab" + oracle_infill(checkpoint, "ab", "yz", 4) + "yz\n"
    for steps in ([], ["--steps", "4"]):
        assert main([*base, *steps]) == 0
        captured = capsys.readouterr()
        assert captured.out == expected and "forwards 4," in captured.err


@pytest.mark.parametrize("command", [
    ["generate", "--device", "cpu", "--gen-length", "8", "--block-length", "8", "x"],
    ["generate", "--device", "cpu", "--gen-length", "8", "--block-length", "8", "--show-steps", "x"],
    ["generate", "--device", "cpu", "--gen-length", "8", "--block-length", "8", "--prompts-file", "-"],
    ["infill", "--device", "cpu", "--length", "4"],
], ids=["generate", "show-steps", "prompts-file", "infill"])
def test_a_closed_standard_output_is_named(checkpoint, command):
    # Started with `>&-`: the answer would go nowhere (and --show-steps and
    # the progress bar would ask sys.stdout, None, whether it is a terminal).
    argv = [sys.executable, "-m", "llada.cli", command[0], "--model", str(checkpoint), *command[1:]]
    run = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *argv], input=b'"x"\n', stderr=subprocess.PIPE,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 2, run.stderr.decode()
    assert run.stderr.decode() == "llada: error: standard output is closed\n"


def test_bad_arguments(checkpoint, capsys, tmp_path):
    for flags, named in ((["--gen-length", "20", "--block-length", "8"], "--gen-length: expected a multiple of"),
                         (["--model", str(tmp_path / "missing")], "--model: "),
                         (["--remask-below", "2", "--commit", "threshold"],
                          "--remask-below: expected a value in (0, 1), got 2.0"),
                         (["--remask-below", "0.5"], "--remask-below: needs a commit rule that adapts the step count"),
                         (["--refresh-every", "-1", "--cache", "prefix"],
                          "--refresh-every: expected an int >= 0, got -1"),
                         (["--gamma", "-0.5", "--commit", "entropy_bound"],
                          "--gamma: expected a finite value >= 0, got -0.5"),
                         (["--factor", "0", "--commit", "factor"], "--factor: expected a finite value > 0, got 0.0"),
                         # Flags the policy would not use:
                         (["--threshold", "0.5"], "--threshold: applies with --commit threshold"),
                         (["--policy", "fast", "--gamma", "0.2"], "--gamma: applies with --commit entropy_bound"),
                         (["--commit", "threshold", "--factor", "2"], "--factor: applies with --commit factor"),
                         (["--refresh-every", "2"], "--refresh-every: applies with a cache"),
                         (["--stream", "--show-steps"], "--show-steps, --stream: pick one")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(checkpoint), *flags, "x"])
        assert e.value.code == 2 and named in capsys.readouterr().err
    for flags in ([], ["--prompts-file", str(tmp_path / "missing.jsonl")]):
        code = 0
        try:
            code = main(["generate", "--model", str(checkpoint), *flags])
        except SystemExit as e:
            code = e.code
        assert code == 2
        assert ("prompt" if not flags else "--prompts-file") in capsys.readouterr().err


def test_make_random_checkpoint(tmp_path, capsys):
    assert main(["make-random-checkpoint", str(tmp_path / "ck"), "--seed", "3", "--shards", "2"]) == 0
    # Every file readable as any new file is (not only the weights' owner).
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "ck").iterdir()} == \
        {f.name: 0o666 & ~umask for f in (tmp_path / "ck").iterdir()}
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model.safetensors.index.json").is_file()
    # --seed decides the weights: the same seed gives the same ones, another seed others.
    for name, seed in (("again", "3"), ("other", "4")):
        assert main(["make-random-checkpoint", str(tmp_path / name), "--seed", seed]) == 0
        assert Path(capsys.readouterr().out.strip()) == tmp_path / name
    weights, again, other = (NaiveLLaDA(tmp_path / name).w for name in ("ck", "again", "other"))
    assert list(weights) and sorted(weights) == sorted(again) == sorted(other)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not any(torch.equal(weights[k], other[k]) for k in weights if weights[k].std() > 0)
    model = llada.load_model(folder, device="cpu")
    assert model.config.d_model == 64
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # Never written over a checkpoint: the one there stays as it was.
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["make-random-checkpoint", str(folder), "--seed", "4"])
    assert e.value.code == 2 and "DIR: " in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    # A folder of other files is fine.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("mine")
    assert main(["make-random-checkpoint", str(tmp_path / "notes")]) == 0
    assert (tmp_path / "notes" / "README.txt").read_text() == "mine"
    # A folder that cannot be made: named, no traceback.
    with pytest.raises(SystemExit) as e:
        main(["make-random-checkpoint", str(tmp_path / "notes" / "README.txt" / "ck")])
    assert e.value.code == 2 and "DIR: cannot write" in capsys.readouterr().err


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
    every = policy("--commit", "entropy_bound", "--gamma", "0.25",
                   "--cache", "prefix", "--refresh-every", "3", "--remask-below", "0.2")
    assert every == llada.DecodePolicy(commit="entropy_bound", gamma=0.25,
                                       cache="prefix", refresh_every=3, remask_below=0.2)
    assert policy("--ranking", "margin") == llada.DecodePolicy(ranking="margin")
    assert not policy("--cache", "dual", "--no-cuda-graph").cuda_graph


def test_stop_ends_the_printed_answer(checkpoint, capsys):
    full = oracle_answer(checkpoint, "Hello there")
    stop = full[3:5]
    assert stop and full.find(stop) >= 0
    for flags in ([], ["--stream"], ["--show-steps"]):
        assert main(["generate", "--model", str(checkpoint), *ARGS, *flags, "--stop", stop, "Hello there"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n" + full[:full.find(stop)] + "\n") or out == full[:full.find(stop)] + "\n", flags


def test_likelihood_prints_the_estimate(checkpoint, capsys):
    tok = llada.load_tokenizer(checkpoint)
    model = llada.load_model(checkpoint, device="cpu")
    expected = llada.log_likelihood(model, tok("Q: hi", add_special_tokens=False)["input_ids"],
                                    tok(" there", add_special_tokens=False)["input_ids"], mc_num=32, seed=4)
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q: hi",
                 "--answer", " there", "--mc-num", "32", "--seed", "4"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(expected, abs=1e-6)
    # Several answers: one line each, in order, each with the same draws.
    answers = [" there", " you", " x"]
    expected = [llada.log_likelihood(model, tok("Q: hi", add_special_tokens=False)["input_ids"],
                                     tok(a, add_special_tokens=False)["input_ids"], mc_num=16, seed=9)
                for a in answers]
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q: hi", "--mc-num", "16",
                 "--seed", "9", *[arg for a in answers for arg in ("--answer", a)]]) == 0
    assert [float(x) for x in capsys.readouterr().out.split()] == pytest.approx(expected, abs=1e-6)
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q",
                 "--answer", ""]) == 2
    assert "--answer: answer 1 is empty" in capsys.readouterr().err
    # The prompt's faults name --prompt.
    for prompt, message in (("Q <|mdm_mask|>", "--prompt: the text holds the mask token"),
                            ("Q " * 600, "--prompt: its 1200 tokens leave no room for an answer")):
        assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", prompt,
                     "--answer", "x"]) == 2
        assert message in capsys.readouterr().err
    # Guidance so strong that the logits overflow: an error, not "nan".
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q", "--answer", " x",
                 "--cfg-scale", "1e39", "--mc-num", "2", "--batch-size", "2"]) == 2
    captured = capsys.readouterr()
    assert "the estimate is not a number" in captured.err and captured.out == ""


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                 "allocate 9 bytes.\nmore"),
                                    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")])
def test_out_of_memory_is_one_line(checkpoint, capsys, monkeypatch, error):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(llada.Engine, "log_likelihood", fails)
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q",
                 "--answer", " x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: out of memory (") and err.count("\n") == 1
    # Other runtime errors stay tracebacks: they are bugs to see.
    monkeypatch.setattr(llada.Engine, "log_likelihood", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompt", "Q", "--answer", " x"])


@pytest.mark.parametrize("command, flags, method, hinted", [
    ("generate", ["x"], "generate", {"--gen-length", "--prompts-file", "--batch-size"}),
    ("generate", ["--stream", "x"], "stream", {"--gen-length", "--prompts-file", "--batch-size"}),
    ("chat", [], "stream", {"--gen-length"}),
    ("infill", ["--length", "4"], "infill", {"--length"}),
    ("likelihood", ["--prompt", "Q", "--answer", " x"], "log_likelihood", {"--batch-size"}),
])
def test_out_of_memory_hints_at_flags_of_the_subcommand(checkpoint, capsys, monkeypatch, command, flags, method,
                                                        hinted):
    def fails(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    monkeypatch.setattr(llada.Engine, method, fails)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))  # chat's one message
    assert main([command, "--model", str(checkpoint), "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: out of memory (CUDA out of memory.") and err.count("\n") == 1
    assert set(re.findall(r"--[a-z-]+", err)) == hinted


def test_likelihood_prompts_file_scores_every_answer_of_every_line(checkpoint, capsys, tmp_path):
    tok = llada.load_tokenizer(checkpoint)
    model = llada.load_model(checkpoint, device="cpu")

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    lines = [{"prompt": "Q: hi", "answers": [" there", " you"], "id": "a"},
             {"prompt": "2 + 2 =", "answers": [" 4"], "gold": 0}]
    path = tmp_path / "scoring.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    base = ["likelihood", "--model", str(checkpoint), "--device", "cpu", "--mc-num", "16", "--seed", "3"]
    assert main([*base, "--prompts-file", str(path)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{k: v for k, v in p.items() if k != "log_likelihoods"} for p in printed] == lines
    for line, out in zip(lines, printed):
        want = [llada.log_likelihood(model, ids(line["prompt"]), ids(a), mc_num=16, seed=3) for a in line["answers"]]
        assert out["log_likelihoods"] == pytest.approx(want, abs=1e-6)
    # What a line must hold, and what may not be given with the file.
    for content, message in (('{"prompt": "a"}', '"answers", a non-empty list of strings'),
                             ('{"prompt": "a", "answers": []}', '"answers", a non-empty list'),
                             ('"a"', "expected an object"),
                             ('{"prompt": "a", "answers": ["b"], "log_likelihoods": 1}', 'has the key "log_likelihoods"'),
                             ('{"messages": [], "answers": ["b"]}',
                              'line 1: "messages" (a conversation) needs --chat')):
        path.write_text(content + "\n", encoding="utf-8")
        assert main([*base, "--prompts-file", str(path)]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--prompts-file", str(path), "--prompt", "x", "--answer", "y"])
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--prompt", "x"])
    assert "--prompt and --answer" in capsys.readouterr().err


def test_a_reader_that_leaves_ends_the_command_quietly(checkpoint):
    # stdout is a pipe whose reading end is closed before the first answer
    # is printed (as with `| head -0`): no traceback, the SIGPIPE status.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.Popen(
        [sys.executable, "-m", "llada.cli", "generate", "--model", str(checkpoint), *ARGS, "Hello there"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    run.stdout.close()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 141, err.decode()
    assert b"Traceback" not in err


def test_an_interrupt_ends_the_command_quietly(checkpoint, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(llada.Engine, "generate", interrupted)
    prompts = checkpoint.parent / "one.jsonl"
    prompts.write_text('"Hello"\n')
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(prompts)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_model_too_large_for_memory_is_a_clear_error(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: 1000)
    assert main(["generate", "--model", str(checkpoint), *ARGS, "Hi"]) == 2
    assert "llada: error: dtype: the model's" in capsys.readouterr().err


def _chat(checkpoint, monkeypatch, capsys, lines, *flags, code=0):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", "--model", str(checkpoint), *ARGS, *flags]) == code
    return capsys.readouterr()


def _templated(folder, messages):
    return llada.load_tokenizer(folder).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_chat_answers_each_turn_with_the_conversation_so_far(checkpoint, monkeypatch, capsys):
    out = _chat(checkpoint, monkeypatch, capsys, ["Hi", "", "And then?", "/reset", "Bye"],
                "--system", "Be kind.").out.split("\n")
    system = [{"role": "system", "content": "Be kind."}]
    first = oracle_answer(checkpoint, _templated(checkpoint, system + [{"role": "user", "content": "Hi"}]))
    second = oracle_answer(checkpoint, _templated(checkpoint, system + [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"}]))
    third = oracle_answer(checkpoint, _templated(checkpoint, system + [{"role": "user", "content": "Bye"}]))
    assert "\n".join(out) == f"{first}\n{second}\n{third}\n"


def test_chat_drops_the_oldest_turns_that_no_longer_fit(tmp_path, monkeypatch, capsys):
    folder = make_checkpoint(tmp_path, seed=4, max_sequence_length=80)  # 64 tokens of prompt at most
    turns = ["Hi there", "More please", "And the last", "Done now"]
    captured = _chat(folder, monkeypatch, capsys, turns + ["x " * 40], code=2)  # a turn failed
    assert "dropped its oldest turn" in captured.err
    assert "the message alone is too long" in captured.err
    # Each answer saw what fitted: the latest turns, as many as 64 tokens take.
    tok = llada.load_tokenizer(folder)
    kept: list[dict] = []
    expected = ""
    for text in turns:
        kept.append({"role": "user", "content": text})
        while len(tok(_templated(folder, kept), add_special_tokens=False)["input_ids"]) > 64:
            kept = kept[2:]
        answer = oracle_answer(folder, _templated(folder, kept))
        expected += answer + "\n"
        kept.append({"role": "assistant", "content": answer})
    assert captured.out == expected
    assert len(kept) < 2 * len(turns)  # something was dropped


def test_python_dash_m_runs_the_command(checkpoint):
    run = subprocess.run([sys.executable, "-m", "llada", "generate", "--model", str(checkpoint), *ARGS, "Hello there"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == oracle_answer(checkpoint, "Hello there") + "\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_ctrl_c_at_a_terminal_stops_the_answer_not_the_chat(checkpoint, monkeypatch, capsys):
    real_stream = llada.Engine.stream
    calls = []

    def stream(self, prompt, **options):
        calls.append(list(prompt))  # as it was at the call
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_stream(self, prompt, **options)

    monkeypatch.setattr(llada.Engine, "stream", stream)
    monkeypatch.setattr(sys, "stdin", _Terminal("First\nSecond\n"))
    assert main(["chat", "--model", str(checkpoint), *ARGS]) == 0
    captured = capsys.readouterr()
    assert "answer interrupted" in captured.err
    # The interrupted turn is not part of the conversation the second answer sees.
    assert calls[1] == [{"role": "user", "content": "Second"}]
    second = oracle_answer(checkpoint, _templated(checkpoint, [{"role": "user", "content": "Second"}]))
    assert captured.out == "\n" + second + "\n"
    # Not at a terminal, Ctrl-C ends the command.
    calls.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("First\n"))
    assert main(["chat", "--model", str(checkpoint), *ARGS]) == 130


def _exit_code(argv):
    """main's status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_steps_counts_the_fixed_schedule_alone(checkpoint, capsys):
    # Without --steps the fixed schedule commits one token per step.
    assert main(["generate", "--model", str(checkpoint), "--device", "cpu", "--gen-length", "16",
                 "--block-length", "8", "--stats", "x"]) == 0
    assert "forwards 16," in capsys.readouterr().err
    # An adaptive rule decides its own steps: the default gen length needs none, and an explicit count is an error.
    fast = ["generate", "--model", str(checkpoint), "--device", "cpu", "--policy", "fast", "--gen-length", "16",
            "--block-length", "16"]
    assert main([*fast, "x"]) == 0
    assert _exit_code([*fast, "--steps", "16", "x"]) == 2
    assert "--steps: the fixed schedule's step count; --commit threshold decides its own" in capsys.readouterr().err
    # --show-steps has no total to show for it.
    assert main([*fast, "--show-steps", "x"]) == 0
    *steps, _ = capsys.readouterr().out.splitlines()
    assert steps and all(line.split(":")[0] == f"step {i}" for i, line in enumerate(steps, 1))


@pytest.mark.parametrize("content, flags, message", [
    # A bad line late in the file: nothing is decoded before the error.
    ("\n".join(['"a"'] * 10 + ['{"messages": [{"role": "user"}]}']), ["--chat"],
     "line 11: messages[0]: expected a message"),
    ("\n".join(['"a"'] * 2 + [json.dumps("x" * 600)]), [], "line 3: 600 tokens and --gen-length 16 exceed"),
    ('"a"\n{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}',
     ["--chat", "--system", "S"], "line 2: --system: the conversation already has a system message"),
    ('"a"\n{"messages": []}', ["--chat"], 'line 2: "messages": expected a non-empty list'),
    ('"a"\n"b"\n"c <|mdm_mask|>"', [], "line 3: the text holds the mask token"),
])
def test_prompts_file_lines_are_all_checked_before_decoding(checkpoint, capsys, tmp_path, content, flags, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--batch-size", "1", "--prompts-file", str(path),
                 *flags]) == 2
    captured = capsys.readouterr()
    assert f"--prompts-file {path} {message}" in captured.err and captured.out == ""


@pytest.mark.parametrize("second_line, message", [
    ('{"prompt": "c", "answers": ["d", ""]}', "line 2: answer 2 is empty"),
    ('{"prompt": "c <|mdm_mask|>", "answers": ["d"]}', "line 2: the text holds the mask token"),
    ('{"prompt": "c", "answers": ["d", "e <|mdm_mask|>"]}', "line 2: answer 2: the text holds the mask token"),
])
def test_likelihood_prompts_file_lines_are_all_checked_before_scoring(checkpoint, capsys, tmp_path, second_line,
                                                                       message):
    path = tmp_path / "scoring.jsonl"
    path.write_text('{"prompt": "a", "answers": ["b"]}\n' + second_line + "\n", encoding="utf-8")
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--mc-num", "1", "--batch-size", "1",
                 "--prompts-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"--prompts-file {path} {message}" in captured.err and captured.out == ""


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--show-steps"], ["--prompts-file", "-"]])
def test_an_empty_stop_string_is_refused_in_every_mode(checkpoint, capsys, monkeypatch, flags):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'"x"\n')))
    prompt = [] if "--prompts-file" in flags else ["x"]
    assert _exit_code(["generate", "--model", str(checkpoint), *ARGS, "--stop", "", *flags, *prompt]) == 2
    captured = capsys.readouterr()
    assert "--stop: expected a non-empty text" in captured.err and captured.out == ""


@pytest.mark.parametrize("flags, message", [
    (["--seed", "18446744073709551"], "--seed: expected an int in [0, "),  # beyond what the writer can seed
    (["--shards", "0"], "--shards: expected an int in [1, 21]"),
    (["--shards", "1000"], "--shards: expected an int in [1, 21]"),
])
def test_make_random_checkpoint_checks_its_arguments_before_writing(tmp_path, capsys, flags, message):
    assert _exit_code(["make-random-checkpoint", str(tmp_path / "new" / "ck"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_make_random_checkpoint_needs_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["make-random-checkpoint", ""]) == 2
    assert "DIR: expected a folder, got an empty path" in capsys.readouterr().err
    (tmp_path / "file").write_text("mine")
    assert _exit_code(["make-random-checkpoint", "file"]) == 2
    assert "DIR: file is a file, not a folder" in capsys.readouterr().err
    assert [f.name for f in tmp_path.iterdir()] == ["file"]


def test_chat_refuses_a_gen_length_the_model_cannot_fit(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    # 512 tokens fill the tiny model's context: no room for the template.
    assert _exit_code(["chat", "--model", str(checkpoint), "--device", "cpu", "--gen-length", "512"]) == 2
    captured = capsys.readouterr()
    assert "--gen-length: 512 tokens and the chat template's" in captured.err and captured.out == ""


@pytest.mark.parametrize("command", [["generate", "x"], ["chat"], ["infill", "--length", "4"],
                                     ["likelihood", "--prompt", "a", "--answer", "b"],
                                     ["make-random-checkpoint", "unwritten"]])
@pytest.mark.parametrize("seed", ["-1", str(2**63), "1.5"])
def test_seed_is_checked_when_parsed(capsys, command, seed):
    assert _exit_code([*command, "--seed", seed]) == 2
    assert "argument --seed: expected an int" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["generate", "\udcff"], "argument prompt"),
    (["generate", "--stop", "\udcff", "x"], "argument --stop"),
    (["generate", "--chat", "--system", "\udcff", "x"], "argument --system"),
    (["infill", "--prefix", "\udcff", "--length", "4"], "argument --prefix"),
    (["infill", "--suffix", "\udcff", "--length", "4"], "argument --suffix"),
    (["likelihood", "--prompt", "a", "--answer", "\udcff"], "argument --answer"),
])
def test_text_that_is_not_utf8_is_named(capsys, argv, named):
    # Bytes that are not UTF-8 in sys.argv arrive as lone surrogates.
    assert _exit_code(argv) == 2
    assert f"{named}: not valid UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    ("y " * 600, "standard input line 2: the message alone is too long"),
])
def test_chat_reports_a_message_it_cannot_take_and_keeps_the_conversation(checkpoint, capsys, monkeypatch, bad,
                                                                          message):
    captured = _chat(checkpoint, monkeypatch, capsys, ["Hi", bad, "And then?"], code=2)  # a turn failed
    assert message in captured.err and "dropped" not in captured.err
    first = oracle_answer(checkpoint, _templated(checkpoint, [{"role": "user", "content": "Hi"}]))
    second = oracle_answer(checkpoint, _templated(checkpoint, [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"}]))
    assert captured.out == f"{first}\n{second}\n"
    # (The history shows: alone, the last message gets another answer.)
    assert second != oracle_answer(checkpoint, _templated(checkpoint, [{"role": "user", "content": "And then?"}]))


def test_a_chat_template_that_raises_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    folder = make_checkpoint(tmp_path, seed=2)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    # Templates raise on what they do not take: here a last message "Ho".
    refuse = "{% if messages and messages[-1]['content'] == 'Ho' %}{{ raise_exception('no Ho') }}{% endif %}"
    template = config["chat_template"]
    config["chat_template"] = refuse + template
    config_file.write_text(json.dumps(config))
    assert main(["generate", "--model", str(folder), *ARGS, "--chat", "Ho"]) == 2
    assert "chat: the tokenizer's chat template failed on this conversation: TemplateError: no Ho" in \
        capsys.readouterr().err
    # In a chat the message is reported and skipped.
    captured = _chat(folder, monkeypatch, capsys, ["Hi", "Ho", "Bye"], code=2)
    assert "standard input line 2: chat: the tokenizer's chat template failed" in captured.err
    first = oracle_answer(folder, _templated(folder, [{"role": "user", "content": "Hi"}]))
    second = oracle_answer(folder, _templated(folder, [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Bye"}]))
    assert captured.out == f"{first}\n{second}\n"


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe hi\nHi\n"), encoding="utf-8"))
    assert main(["chat", "--model", str(checkpoint), *ARGS]) == 2  # a turn failed
    captured = capsys.readouterr()
    assert "standard input line 1: not valid UTF-8 text" in captured.err
    assert captured.out == oracle_answer(checkpoint, _templated(checkpoint, [{"role": "user", "content": "Hi"}])) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--steps", "0", "x"], "--steps: expected a multiple of the number of blocks (4)"),
    (["generate", "--steps", "256", "x"], "at most --gen-length (128)"),
    (["generate", "--gen-length", "0", "x"], "--gen-length: expected a positive int"),
    (["generate", "--gen-length", "16", "--block-length", "32", "x"], "--gen-length: expected a multiple of "
                                                                      "--block-length (32)"),
    (["generate", "--temperature", "-1", "x"], "--temperature: expected a finite number >= 0"),
    (["chat", "--cfg-scale", "inf"], "--cfg-scale: expected a finite number >= 0"),
    (["likelihood", "--prompt", "a", "--answer", "b", "--mc-num", "8"], "--mc-num: expected a multiple of "
                                                                         "--batch-size (16)"),
    (["likelihood", "--prompt", "a", "--answer", "b", "--batch-size", "0"], "--batch-size: expected a positive"),
    (["infill", "--length", "8", "--block-length", "4", "--steps", "3"], "--steps: expected a multiple"),
    (["infill", "--length", "0"], "--length: expected a positive int"),
    (["infill", "--length", "4", "--steps", "8"], "at most --length (4), got 8"),
    (["infill", "--length", "5", "--block-length", "2", "--steps", "12"], "at most 3 blocks of --block-length (6)"),
    # A block longer than the gap is the gap: its steps are bounded by the gap's length.
    (["infill", "--length", "4", "--block-length", "8", "--steps", "5"], "at most --length (4), got 5"),
    (["infill", "--length", "8", "--block-length", "1000000", "--steps", "1000000"],
     "--steps: expected a multiple of the number of blocks (1), at most --length (8), got 1000000"),
    (["infill", "--length", "8", "--block-length", str(10**20), "--steps", str(10**19)],
     f"--steps: expected a multiple of the number of blocks (1), at most --length (8), got {10**19}"),
    (["generate", "--device", "", "x"], "--device: expected cpu or cuda[:N], got an empty string"),
    (["likelihood", "--device", " ", "--prompt", "a", "--answer", "b"], "--device: expected cpu or cuda[:N]"),
    (["make-random-checkpoint", "unwritten", "--shards", "0"], "--shards: expected an int in [1, 21]"),
    (["generate", "--model", "/nonexistent", "x"], "--model: /nonexistent does not exist"),
    (["generate", "--model", __file__, "x"], "is not a folder"),
    # --remasking random is --ranking random, low_confidence any other: given both, they must agree.
    (["generate", "--ranking", "margin", "--remasking", "random", "x"],
     "--remasking random, --ranking margin: the two disagree"),
    (["generate", "--ranking", "probability", "--remasking", "random", "x"],
     "--remasking random, --ranking probability: the two disagree"),
    (["chat", "--remasking", "low_confidence", "--ranking", "random"],
     "--remasking low_confidence, --ranking random: the two disagree"),
    (["generate", "--policy", "fast", "--remasking", "random", "--ranking", "entropy", "x"],
     "--remasking random, --ranking entropy: the two disagree"),
    # The entropy_bound rule takes no ranking: naming one, even the default, is an error.
    (["chat", "--commit", "entropy_bound", "--remasking", "random"], "--remasking: the entropy_bound rule"),
    (["chat", "--commit", "entropy_bound", "--remasking", "low_confidence"], "--remasking: the entropy_bound rule"),
    (["generate", "--commit", "entropy_bound", "--ranking", "probability", "x"], "--ranking: the entropy_bound rule"),
])
def test_decoding_flags_are_checked_before_the_model_loads(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("llada.cli.load_for_cli", lambda args: pytest.fail("the model was loaded"))
    assert _exit_code(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, ranking", [
    ([], "probability"),
    (["--remasking", "low_confidence"], "probability"),
    (["--ranking", "probability"], "probability"),
    (["--remasking", "low_confidence", "--ranking", "probability"], "probability"),
    (["--remasking", "low_confidence", "--ranking", "margin"], "margin"),
    (["--remasking", "low_confidence", "--ranking", "entropy"], "entropy"),
    (["--remasking", "random"], "random"),
    (["--ranking", "random"], "random"),
    (["--remasking", "random", "--ranking", "random"], "random"),
])
def test_remasking_and_ranking_that_agree_decode_by_that_ranking(checkpoint, capsys, flags, ranking):
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--seed", "3", *flags, "Hello"]) == 0
    expected = llada.load(checkpoint, device="cpu").generate(
        "Hello", steps=8, gen_length=16, block_length=8, seed=3, policy=llada.DecodePolicy(ranking=ranking))
    assert capsys.readouterr().out == expected + "\n"
    if ranking == "probability":  # the official algorithm
        assert expected == oracle_answer(checkpoint, "Hello")


def test_errors_show_the_usage_of_their_subcommand(capsys):
    assert _exit_code(["generate", "--system", "x", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: llada generate ") and "llada generate: error: --system" in err


@pytest.mark.parametrize("content", ['{"prompt": "x", "messages": "notlist"}',
                                     '{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}'])
@pytest.mark.parametrize("flags", [[], ["--chat"]])
def test_a_line_with_both_prompt_and_messages_is_ambiguous(checkpoint, capsys, tmp_path, content, flags):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"a"\n' + content + "\n", encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(path), *flags]) == 2
    assert f'--prompts-file {path} line 2: has both "prompt" and "messages"' in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--cuda-graph", "--no-cuda-graph"])
def test_cuda_graph_flags_need_a_cache(capsys, flag):
    assert _exit_code(["generate", flag, "x"]) == 2
    assert f"{flag}: applies with a cache" in capsys.readouterr().err


def test_batch_size_needs_a_prompts_file(capsys):
    assert _exit_code(["generate", "--batch-size", "4", "x"]) == 2
    assert "--batch-size: applies with --prompts-file" in capsys.readouterr().err


def _strict_json(line):
    """A line as JSON readers that know no NaN or Infinity read it."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_prompts_file_lines_keep_their_numbers_as_written(checkpoint, capsys, tmp_path):
    # 1e400 overflows a float and 12345678901234567.5 has more digits than one holds:
    # read and written again they would become Infinity (no JSON) and 1.2345678901234568e+16.
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hi", "id": 1e400, "ref": 12345678901234567.5}\n"Hey"\n', encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('{"prompt": "Hi", "id": 1e400, "ref": 12345678901234567.5, "answer": ')
    assert [_strict_json(line)["answer"] for line in lines] == oracle_batch_answers(checkpoint, ["Hi", "Hey"])
    assert _strict_json(lines[1]) == {"prompt": "Hey", "answer": oracle_answer(checkpoint, "Hey")}
    # An integer longer than Python's int takes from text (4300 digits) is JSON too.
    huge = "9" * 5000
    path.write_text(f'{{"id": {huge}, "prompt": "Hi"}}\n', encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f'{{"id": {huge}, "prompt": "Hi", "answer": ')

    path.write_text('{"id": 1e400, "prompt": "Q", "answers": [" x"]}\n', encoding="utf-8")
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--mc-num", "4", "--batch-size", "4",
                 "--seed", "1", "--prompts-file", str(path)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith('{"id": 1e400, "prompt": "Q", "answers": [" x"], "log_likelihoods": [')
    estimate = llada.load(checkpoint, device="cpu").log_likelihood("Q", " x", mc_num=4, batch_size=4, seed=1)
    assert _strict_json(line)["log_likelihoods"] == pytest.approx([estimate], abs=1e-6)


def test_a_minus_infinite_estimate_is_written_as_null(checkpoint, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(llada.Engine, "log_likelihood", lambda self, *args, **kwargs: float("-inf"))
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Q", "answers": [" x", " y"]}\n', encoding="utf-8")
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--prompts-file", str(path)]) == 0
    assert _strict_json(capsys.readouterr().out)["log_likelihoods"] == [None, None]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "x", "id": NaN}', "line 1: not JSON (NaN is not a JSON value)"),
    ('{"prompt": "x", "id": -Infinity}', "line 1: not JSON (-Infinity is not a JSON value)"),
    ("[" * 100000 + "]" * 100000, "line 1: nested too deeply for Python's json to read"),
])
def test_prompts_file_lines_python_reads_but_cannot_keep_are_named(checkpoint, capsys, tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content + "\n", encoding="utf-8")
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", str(path)]) == 2
    assert f"llada: error: --prompts-file {path} {message}" in capsys.readouterr().err


LONG = "1" * 4500  # longer than the 4300 digits Python's int takes from text


@pytest.mark.parametrize("command, content, flags, message", [
    ("generate", '"ok"\n{"prompt": 5}', [], 'line 2: "prompt": expected a string, got 5'),
    ("generate", f'"ok"\n{{"prompt": {LONG}}}', [], f'line 2: "prompt": expected a string, got {LONG}'),
    ("generate", f'{{"messages": {LONG}}}', ["--chat"],
     f'line 1: "messages": expected a non-empty list of {{"role", "content"}} objects, got {LONG}'),
    ("generate", f'{{"messages": {{"a": [{LONG}, "b"]}}}}', ["--chat"],
     f'line 1: "messages": expected a non-empty list of {{"role", "content"}} objects, got {{"a": [{LONG}, "b"]}}'),
    ("generate", f'{{"messages": [{{"role": "user", "content": {LONG}}}]}}', ["--chat"],
     f"line 1: messages[0]: expected a message {{\"role\": str, \"content\": str}}, got "
     f"{{'role': 'user', 'content': {LONG}}}"),
    ("likelihood", f'{{"prompt": {LONG}, "answers": ["x"]}}', [], f'line 1: "prompt": expected a string, got {LONG}'),
])
def test_prompts_file_names_a_long_integer_where_text_belongs(checkpoint, capsys, tmp_path, command, content, flags,
                                                             message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content + "\n", encoding="utf-8")
    decoding = ARGS if command == "generate" else ["--device", "cpu"]
    assert main([command, "--model", str(checkpoint), *decoding, "--prompts-file", str(path), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"llada: error: --prompts-file {path} {message}\n" and captured.out == ""


def test_a_closed_standard_input_is_named(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with `<&-`
    assert _exit_code(["generate", "--model", str(checkpoint), *ARGS, "--prompts-file", "-"]) == 2
    assert "llada: error: --prompts-file -: standard input is closed" in capsys.readouterr().err
    assert _exit_code(["chat", "--model", str(checkpoint), *ARGS]) == 2
    assert "llada chat: error: standard input is closed" in capsys.readouterr().err


@pytest.mark.parametrize("data, expected", [
    # A lone CR is JSON whitespace inside a line; only "\n" ends a JSON Lines line.
    (b'{"prompt": "a",\r"id": 1}\n{"prompt": "b"}\n', [{"prompt": "a", "id": 1}, {"prompt": "b"}]),
    (b'"a"\r \n{"prompt": 5}\n', 'line 2: "prompt": expected a string, got 5'),
    (b'\xef\xbb\xbf"a"\r\n\r\n"b"\r\n{"prompt": 5}\r\n', 'line 4: "prompt": expected a string, got 5'),
    (b'"a\rb"\n', "line 1: not JSON (Invalid control character at)"),
], ids=["cr-inside-a-line", "cr-before-a-newline", "crlf-and-byte-order-mark", "cr-inside-a-string"])
def test_prompts_file_reads_a_file_and_standard_input_alike(tmp_path, monkeypatch, data, expected):
    from llada.prompts_file import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="ascii"))
    for source, name in ((str(path), str(path)), ("-", "standard input")):
        if isinstance(expected, list):
            assert [line.value for line in read_prompts(source, chat=False)] == expected
        else:
            with pytest.raises(ValueError) as e:
                read_prompts(source, chat=False)
            assert str(e.value) == f"--prompts-file {name} {expected}"


def test_an_output_line_holds_no_carriage_return():
    # A lone CR between JSON values is whitespace; copied as is, a reader in
    # text mode would split the output line in two.
    from llada.prompts_file import Line, output_line

    for text in ('{"prompt": "a",\r"id": 1}\r', '\r"a"\r'):
        out = output_line(Line("line 1", json.loads(text), text), "answer", "b")
        assert "\r" not in out
        assert out.splitlines() == [out]
        assert json.loads(out) == dict(json.loads(text) if text.strip().startswith("{") else {"prompt": "a"},
                                       answer="b")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--device", "foo", "x"], "llada: error: --device: expected 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
    (["likelihood", "--prompt", "a", "--answer", "b", "--mc-num", str(10**20), "--batch-size", str(10**20)],
     f"--mc-num: expected at most {2**31 - 1}, got {10**20}"),
    (["likelihood", "--prompt", "a", "--answer", "b", "--mc-num", "16", "--batch-size", str(2**40)],
     f"--batch-size: expected at most {2**31 - 1}"),
])
def test_errors_name_the_flag(checkpoint, capsys, argv, message):
    assert _exit_code([argv[0], "--model", str(checkpoint), *argv[1:]]) == 2
    assert message in capsys.readouterr().err


def test_errors_never_reach_standard_output_when_standard_error_is_closed(capsys, monkeypatch, tmp_path):
    # With fd 2 closed Python's sys.stderr is None, and print(file=None)
    # writes to standard output: among the answers.
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('"a"\n{"prompt": 5}\n')
    monkeypatch.setattr(sys, "stderr", None)
    for argv in (["generate", "--device", "tpu", "x"], ["generate", "--prompts-file", str(bad)]):
        assert main(argv) == 2
        assert capsys.readouterr().out == ""


def test_cuda_without_a_gpu_names_the_flag(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cuda", "--prompt", "a", "--answer", "b"]) == 2
    assert "llada: error: --device: cuda requested but CUDA is not available" in capsys.readouterr().err


def test_a_system_message_too_long_for_the_context_is_named(checkpoint, capsys, monkeypatch):
    system = "x " * 300  # with the template, more than the 512 - 16 tokens left for a prompt
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert _exit_code(["chat", "--model", str(checkpoint), *ARGS, "--system", system]) == 2
    assert "llada chat: error: --system: the system message's" in capsys.readouterr().err
    assert main(["generate", "--model", str(checkpoint), *ARGS, "--chat", "--system", system, "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: --system: the system message's")
    assert "leave too little room for --gen-length (16 tokens) in the model's max_sequence_length 512" in err
    assert main(["likelihood", "--model", str(checkpoint), "--device", "cpu", "--chat", "--system", system * 2,
                 "--prompt", "Hi", "--answer", "x"]) == 2
    assert "--system: the system message's" in capsys.readouterr().err


def test_infill_names_a_prefix_too_long_for_any_gap(checkpoint, capfd):
    assert main(["infill", "--model", str(checkpoint), "--device", "cpu", "--prefix", "x " * 600,
                 "--length", "4"]) == 2
    err = capfd.readouterr().err
    assert "llada: error: --prefix/--suffix: the texts make" in err and "no room for a gap" in err
    # llada measures the text itself: no warning from transformers about it.
    assert "Token indices sequence length" not in err


def test_stop_help_tells_of_show_steps_where_there_is_one():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, has_show_steps in (("generate", True), ("chat", False)):
        actions = commands[name]._actions
        stop = next(action for action in actions if "--stop" in action.option_strings)
        # where every block is decoded, stop string or not; chat has no such flag
        assert ("--show-steps" in stop.help) == has_show_steps
        assert any("--show-steps" in action.option_strings for action in actions) == has_show_steps


def test_chat_takes_a_byte_order_mark_as_no_part_of_the_first_line(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\ufeff/reset\n\ufeffHi\n".encode())))
    assert main(["chat", "--model", str(checkpoint), *ARGS]) == 0
    captured = capsys.readouterr()
    assert "a new conversation" in captured.err  # line 1 was the command
    # Only the start of the input is a file's mark: later, U+FEFF is text.
    assert captured.out == oracle_answer(checkpoint, _templated(checkpoint, [{"role": "user",
                                                                              "content": "\ufeffHi"}])) + "\n"


def test_a_model_folder_named_device_is_not_taken_for_the_flag(checkpoint, tmp_path, monkeypatch, capsys):
    # Only the device check's own errors are the --device flag's: this one
    # starts "device: " as it names the folder.
    shutil.copytree(checkpoint, tmp_path / "device")
    config = json.loads((tmp_path / "device" / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"abc": 5}
    (tmp_path / "device" / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "device", "--device", "cpu", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada: error: ") and "--device" not in err


def test_chat_without_a_chat_template_points_to_generate(tmp_path, monkeypatch, capsys):
    folder = make_checkpoint(tmp_path / "base")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--model", str(folder), *ARGS])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--model: {folder}'s tokenizer has no chat template (a base model?): llada chat needs one; " \
           "llada generate takes the text as it stands" in err
