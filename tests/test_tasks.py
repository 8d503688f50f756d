"""Synthetic checkable tasks (llada.tasks): deterministic data, exact
verifiers, SFT encoding, and the shipped task models' accuracy."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llada
from llada import tasks
from llada.tokenizer import read_tokenizer, special_ids

from checkpoints import make_checkpoint

TASK_MODELS = Path(llada.__file__).resolve().parent / "task_models"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_examples_are_deterministic_distinct_and_correct(name):
    a = tasks.make_examples(name, 200, seed=7)
    assert a == tasks.make_examples(name, 200, seed=7)
    assert a != tasks.make_examples(name, 200, seed=8)
    assert len({e.prompt for e in a}) == 200
    task = tasks.get_task(name)
    for e in a:
        assert len(e.prompt.split()) == task.prompt_tokens
        assert 1 <= len(e.answer.split()) <= task.answer_tokens
        assert is_right(name, e.prompt, e.answer), e
        assert task.check(e.prompt, e.answer)


def is_right(name, prompt, answer):
    """Whether ``answer`` answers ``prompt``, worked out here rather than by
    the task's own solver."""
    words, got = prompt.split(), answer.split()
    assert words[0] == name and words[-1] == "="
    if name == "sort":
        return got == sorted(words[1:-1], key=int)
    if name == "add":
        assert words[4] == "+"
        total = int("".join(words[1:4])) + int("".join(words[5:8]))
        return got == list(str(total))  # most significant digit first, no leading zeros
    assert name == "perm"
    digits = words[1:-1]
    return len(set(digits)) == len(digits) and sorted(got) == sorted(digits)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_training_data_avoids_the_held_out_prompts(name):
    # Besides the held-out set, exclude the first prompts that the training
    # seed itself draws: without the exclusion they would certainly come
    # back, even for sort, whose 10^10 prompts never collide by chance.
    held_out = tasks.held_out_set(name, 300)
    same_seed = tasks.make_examples(name, 100, seed=0)
    train = tasks.make_examples(name, 2000, seed=0, exclude=held_out + same_seed)
    assert len({e.prompt for e in train}) == 2000
    assert not {e.prompt for e in held_out + same_seed} & {e.prompt for e in train}


def every_perm_prompt():
    """All prompts of perm, listed here rather than by the task."""
    import itertools

    return [f"perm {' '.join(d)} =" for d in itertools.permutations("0123456789", 6)]


@pytest.mark.parametrize("name, left", [("perm", 1000), ("perm", 1)])
def test_the_last_prompts_outside_exclude_can_all_be_had(name, left):
    # Random draws alone rarely find the few prompts left (perm with all but
    # 1000 of its 151,200 held out gave up): any n up to what is left works.
    prompts = every_perm_prompt()
    assert len(prompts) == tasks.DISTINCT_PROMPTS[name]
    exclude = [tasks.Example(p, "") for p in prompts[left:]]
    got = tasks.make_examples(name, left, seed=3, exclude=exclude)
    assert sorted(e.prompt for e in got) == sorted(prompts[:left])
    assert all(is_right(name, e.prompt, e.answer) for e in got)
    assert got == tasks.make_examples(name, left, seed=3, exclude=exclude)
    with pytest.raises(ValueError, match=rf"^n: task {name!r} has {left} distinct prompts outside exclude; "
                                         rf"expected at most that, got {left + 1}$"):
        tasks.make_examples(name, left + 1, seed=3, exclude=exclude)


@pytest.mark.parametrize("name, digest", [
    ("add", "54a08c8ae484fdf67556c2ef09423c7dd8541bfae7cbf57d248e105a2e161938"),
    ("perm", "3ec73805c48fa8f8f9eb80ad4f0c19cbfff4f412b525db30fd01021f6c03e3c6"),
], ids=["add", "perm"])
def test_the_shipped_models_data_is_drawn_as_when_they_were_trained(name, digest):
    # The held-out and training sets that the shipped model's data.json
    # records, fingerprinted when the model was trained.
    import hashlib

    data = json.loads((TASK_MODELS / name / "data.json").read_text())
    held_out = tasks.make_examples(name, data["held_out_examples"], data["held_out_seed"])
    train = tasks.make_examples(name, data["train_examples"], data["train_seed"], exclude=held_out)
    text = "\n".join(f"{e.prompt}|{e.answer}" for e in held_out + train)
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_sort_verifier():
    task = tasks.get_task("sort")
    prompt = "sort 3 1 4 1 5 9 2 6 5 3 ="
    assert task.check(prompt, "1 1 2 3 3 4 5 5 6 9")
    assert task.check(prompt, " 1 1 2 3  3 4 5 5 6 9 ")  # whitespace does not matter
    assert not task.check(prompt, "1 1 2 3 3 4 5 5 6")  # one short
    assert not task.check(prompt, "1 1 2 3 3 4 5 5 9 6")  # order
    assert not task.check(prompt, "1 1 2 3 3 4 5 5 6 9 9")  # one too many
    assert not task.check("sort 3 1 4 =", "1 3 4")  # wrong length is not a task prompt
    with pytest.raises(TypeError, match="prompt, answer"):
        task.check(prompt, None)


def test_add_verifier():
    task = tasks.get_task("add")
    assert task.check("add 9 9 9 + 9 9 9 =", "1 9 9 8")
    assert task.check("add 0 0 0 + 0 0 7 =", "7")
    assert task.check("add 4 7 1 + 5 8 3 =", "1 0 5 4")
    assert not task.check("add 4 7 1 + 5 8 3 =", "0 1 0 5 4")  # leading zero
    assert not task.check("add 4 7 1 + 5 8 3 =", "1 0 5 5")
    assert not task.check("add 4 7 x + 5 8 3 =", "1 0 5 4")


def test_perm_verifier_accepts_any_ordering():
    task = tasks.get_task("perm")
    prompt = "perm 3 1 4 5 9 2 ="
    assert task.check(prompt, "3 1 4 5 9 2") and task.check(prompt, "9 5 4 3 2 1")
    assert not task.check(prompt, "3 3 4 5 9 2")  # a repeat (what parallel decoding risks)
    assert not task.check(prompt, "3 1 4 5 9")
    assert not task.check(prompt, "3 1 4 5 9 2 0")
    assert not task.check("perm 3 3 4 5 9 2 =", "3 3 4 5 9 2")  # prompt digits must be distinct


def test_encode_sft_pads_answers_with_eos():
    task = tasks.get_task("add")
    tok = tasks.tokenizer_for(task)
    ids = special_ids(tok)
    examples = [tasks.Example("add 0 0 0 + 0 0 7 =", "7"), tasks.Example("add 9 9 9 + 9 9 9 =", "1 9 9 8")]
    rows, prompt_lengths = tasks.encode_sft(tok, task, examples)
    assert rows.shape == (2, 1 + task.prompt_tokens + task.answer_tokens)
    assert prompt_lengths.tolist() == [1 + task.prompt_tokens] * 2
    assert rows[0, 0] == ids["bos"]
    assert rows[0, -3:].tolist() == [ids["eos"]] * 3
    assert tasks.decode_answer(tok, rows[1, prompt_lengths[1]:].tolist()) == "1 9 9 8"
    assert tasks.decode_answer(tok, rows[0, prompt_lengths[0]:].tolist()) == "7"


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="task"):
        tasks.get_task("multiply")
    with pytest.raises(ValueError, match="n:"):
        tasks.make_examples("sort", -1, seed=0)
    # A bool is no count (Python counts True as 1).
    with pytest.raises(ValueError, match=r"^n: expected a non-negative int, got True$"):
        tasks.make_examples("add", True, seed=0)
    with pytest.raises(ValueError, match=r"^n: expected a non-negative int, got True$"):
        tasks.held_out_set("add", True)


def test_numpy_integers_are_counts():
    n = np.int64(5)
    assert tasks.make_examples("add", n, seed=0) == tasks.make_examples("add", 5, seed=0)
    assert tasks.held_out_set("add", n) == tasks.held_out_set("add", 5)
    assert len(tasks.held_out_set("add", n)) == 5


@pytest.mark.parametrize("batch_size", [0, -8, 2.5, True])
def test_evaluate_refuses_a_batch_size_that_is_not_positive(batch_size):
    # -8 would score no example (accuracy 0 for any model), 0 fail inside range().
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=rf"^batch_size: expected a positive int, got {batch_size!r}$"):
        tasks.evaluate(model, tasks.tokenizer_for("add"), "add", tasks.held_out_set("add", 4), batch_size=batch_size)


def test_evaluate_takes_a_numpy_batch_size():
    # A stand-in decoder that records its batches and answers each prompt
    # with its exact sum, so the accuracy is 1 whatever the model.
    examples, seen = tasks.held_out_set("add", 5), []
    tok = tasks.tokenizer_for("add")
    answers, eos = {e.prompt: e.answer for e in examples}, special_ids(tok)["eos"]

    def solve(model, prompt, gen_length, **_):
        seen.append(len(prompt))
        rows = [tok.encode(answers[tok.decode(row.tolist(), skip_special_tokens=True)],
                           add_special_tokens=False).ids for row in prompt]
        return torch.cat([prompt, torch.tensor([r + [eos] * (gen_length - len(r)) for r in rows])], 1)

    model = torch.nn.Linear(1, 1)
    assert tasks.evaluate(model, tok, "add", examples, batch_size=np.int64(2), generate_fn=solve) == 1.0
    assert seen == [2, 2, 1]


def test_evaluate_refuses_an_engine_with_the_way_to_its_model(tmp_path):
    engine = llada.load(make_checkpoint(tmp_path), device="cpu")
    examples = tasks.held_out_set("add", 2)
    with pytest.raises(TypeError, match=r"^model: expected a model .*got an Engine: pass engine\.model$"):
        tasks.evaluate(engine, tasks.tokenizer_for("add"), "add", examples)


def shipped():
    return sorted(p.name for p in TASK_MODELS.glob("*") if (p / "config.json").is_file())


@pytest.mark.parametrize("name", shipped() or [pytest.param("none", marks=pytest.mark.skip("no task models"))])
def test_shipped_task_model_accuracy(name):
    folder = TASK_MODELS / name
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    tok = read_tokenizer(folder)
    # The full-step low-confidence schedule at temperature 0 (the defaults).
    accuracy = tasks.evaluate(model, tok, name, tasks.held_out_set(name, 50))
    assert accuracy >= 0.94, f"{name}: {accuracy:.2%} exact match on 50 held-out examples"
    assert json.loads((folder / "data.json").read_text())["task"] == name
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5 * 2**20


def _quality():
    """bench/quality.py as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parent.parent / "bench"
                                                  / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_quality_refuses_more_examples_than_training_left_out(tmp_path, capsys):
    import shutil

    folder = tmp_path / "add"
    shutil.copytree(TASK_MODELS / "add", folder)
    data = json.loads((folder / "data.json").read_text())
    (folder / "data.json").write_text(json.dumps(dict(data, held_out_examples=3)))
    # The 4th held-out example may be a training prompt of a model trained to exclude 3.
    with pytest.raises(SystemExit) as refused:
        _quality().main(["--examples", "4", "--models", str(tmp_path), "--device", "cpu"])
    assert refused.value.code == 2
    assert "--examples: expected at most 3, got 4: add's training left out only" in capsys.readouterr().err


@pytest.mark.parametrize("batch_size", ["0", "-250"])
def test_quality_refuses_a_batch_size_that_is_not_positive(batch_size, capsys):
    with pytest.raises(SystemExit) as refused:
        _quality().main(["--batch-size", batch_size, "--examples", "10", "--device", "cpu"])
    assert refused.value.code == 2
    assert f"--batch-size: expected a positive int, got {batch_size}" in capsys.readouterr().err


@pytest.mark.parametrize("gen_length", [4, 6, 10])
def test_quality_two_tokens_per_step_policy_reads_its_cache(gen_length):
    quality = _quality()
    policy = next(p for p in quality.policies() if "2 tokens/step" in p.name)
    kwargs = policy.kwargs(gen_length)
    blocks = gen_length // kwargs["block_length"]
    steps_per_block = kwargs["steps"] // blocks
    assert kwargs["policy"].cache == "dual" and blocks * kwargs["block_length"] == gen_length
    assert steps_per_block >= 2  # a block's first step fills the cache, later ones read it
    assert -(-kwargs["block_length"] // steps_per_block) == 2  # at most two tokens a step, two in some
    assert kwargs["steps"] < gen_length


def test_quality_counts_the_forwards_the_decoder_reports():
    quality = _quality()

    def replayed(model, prompt, *, gen_length, return_stats=False, **kwargs):
        # As CUDA graph replays do: forwards done without calling the model.
        stats = llada.DecodeStats()
        stats.nfe = 3
        out = torch.cat([prompt, torch.zeros(prompt.shape[0], gen_length, dtype=torch.long)], 1)
        return (out, stats) if return_stats else out

    folder = TASK_MODELS / "add"
    model = llada.load_model(folder, device="cpu", dtype=torch.float32)
    policy = quality.Policy("replayed", replayed, lambda n: dict(steps=n, block_length=n))
    _, nfe, _, _ = quality.run(model, read_tokenizer(folder), tasks.get_task("add"), tasks.held_out_set("add", 10),
                               policy, batch_size=5)
    assert nfe == 3  # per batch of answers


def test_tokenizer_builders_refuse_one_text_for_many():
    # A str is an iterable of its characters: taken for the list of words (or
    # texts) it would build a vocabulary of letters.
    from llada.tokenizer import train_bpe, word_tokenizer

    with pytest.raises(TypeError, match="^words: expected an iterable of words"):
        word_tokenizer("plus")
    with pytest.raises(TypeError, match="^texts: expected an iterable of texts"):
        train_bpe("one big text", vocab_size=300)
    tok = word_tokenizer(["plus", "one"])
    assert tok.token_to_id("plus") is not None and tok.token_to_id("p") is None


@pytest.mark.parametrize("min_frequency, error, message", [
    (-1, ValueError, "min_frequency: expected an int >= 0, got -1"),
    (2.5, TypeError, "min_frequency: expected an int >= 0, got float"),
    ("2", TypeError, "min_frequency: expected an int >= 0, got str"),
    (True, TypeError, "min_frequency: expected an int >= 0, got bool"),
])
def test_train_bpe_checks_min_frequency(min_frequency, error, message):
    from llada.tokenizer import train_bpe

    with pytest.raises(error) as e:
        train_bpe(["def f(x):\n    return x\n"] * 20, vocab_size=300, min_frequency=min_frequency)
    assert str(e.value) == message


def test_train_bpe_takes_any_int_min_frequency():
    import numpy as np

    from llada.tokenizer import train_bpe

    texts = ["def f(x):\n    return x\n"] * 20
    assert train_bpe(texts, 300, np.int64(3)).get_vocab() == train_bpe(texts, 300, 3).get_vocab()
    # No pair occurs 2**64 times (beyond what tokenizers counts in): no merge,
    # only the 4 special tokens and the 256 bytes.
    assert train_bpe(texts, 300, 2**64).get_vocab_size() == 4 + 256


def test_quality_reads_the_task_of_each_run_and_skips_other_runs(tmp_path, monkeypatch, capsys):
    # The training scripts save task runs and the pretraining run side by side,
    # and a run's folder may be named anything: its data.json names its task.
    models = tmp_path / "runs"
    shutil.copytree(Path(llada.__file__).resolve().parent / "task_models" / "sort", models / "sort_run")
    (models / "default_model").mkdir()
    (models / "default_model" / "config.json").write_text("{}")
    (models / "default_model" / "data.json").write_text(json.dumps({"corpus": {"files": 3}}))
    (models / "exported").mkdir()
    (models / "exported" / "config.json").write_text("{}")
    quality = _quality()
    monkeypatch.setattr(quality, "policies", lambda: [quality.Policy(
        "fixed, steps = G", llada.generate, lambda n: dict(steps=n, block_length=n))])
    assert quality.main(["--examples", "2", "--batch-size", "2", "--models", str(models), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    rows = [line for line in out.splitlines() if line.startswith("| sort")]
    assert len(rows) == 1  # the task read from data.json, not from the folder's name
    # One batch of 2, 10 steps of one forward each.
    assert rows[0].startswith("| sort (G=10) | fixed, steps = G | 10 | 10 | low_confidence | 10.0 | ")
    not_a_task_model = 'not a task model (no data.json with "task" and "held_out_examples")'
    assert err == (f"quality: skipping {models / 'default_model'}: {not_a_task_model}\n"
                   f"quality: skipping {models / 'exported'}: {not_a_task_model}\n")
    with pytest.raises(SystemExit) as refused:
        quality.main(["--models", str(tmp_path / "none")])
    assert refused.value.code == 2
    assert f"--models: expected a folder of task model folders, got '{tmp_path / 'none'}'" in capsys.readouterr().err
