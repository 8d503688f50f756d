"""The trainer (llada.train): it learns, its checkpoints are real LLaDA
folders, resuming continues the same run, bad arguments are named; and the
bundled default model loads and generates."""

import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

import llada
import llada.tasks
from llada import train
from llada.tokenizer import read_tokenizer, special_ids

TINY = ["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--batch-size", "16",
        "--lr", "1e-2", "--warmup", "2", "--eval-batches", "2", "--no-progress"]
SORT = ["--task", "sort", "--train-examples", "500", "--eval-examples", "64", "--accuracy-examples", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(progress, min_ratio):
    """The documented decay: a half cosine from 1 down to min_ratio."""
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def log_rows(folder):
    with open(Path(folder) / train.LOG_FILE, newline="") as f:
        return list(csv.DictReader(f))


def run(argv):
    assert train.main(argv) == 0


def usage_error(argv, capsys) -> str:
    """What ``llada train`` prints for options it refuses; it exits as argparse does."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_sft_loss_decreases_on_fixed_batches(tmp_path):
    run(SORT + TINY + ["--steps", "20", "--eval-every", "10", "--out", str(tmp_path)])
    rows = log_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [0, 10, 20]
    # eval_loss is measured on the same held-out rows with the same masks.
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"]) - 0.3


def test_pretraining_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    (corpus / "test").mkdir()
    for i in range(6):
        (corpus / "pkg" / f"m{i}.py").write_text(
            "".join(f"def f{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        )
    (corpus / "test" / "test_skip.py").write_text("this file must be excluded\n")
    out = tmp_path / "run"
    run(["--corpus", str(corpus), "--vocab-size", "300", "--seq-len", "32", "--held-out-fraction",
         "0.3", "--steps", "20", "--eval-every", "10", "--out", str(out)] + TINY)
    data = json.loads((out / train.DATA_FILE).read_text())
    assert data["corpus"]["files"] == 6  # test/ left out
    assert len(data["held_out_files"]) == 2
    rows = log_rows(out)
    assert float(rows[-1]["eval_loss"]) < float(rows[0]["eval_loss"])
    tok = llada.load_tokenizer(out)
    assert tok.decode(tok("def f1(x):")["input_ids"], skip_special_tokens=True) == "def f1(x):"
    assert tok.mask_token_id == llada.load_config(out).mask_token_id


def test_a_resumed_pretraining_run_needs_its_files(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i}\n\n" for j in range(30)))
    monkeypatch.chdir(tmp_path)
    common = ["--vocab-size", "300", "--seq-len", "16", "--held-out-fraction", "0.2", "--steps", "4",
              "--eval-every", "2"] + TINY
    run(["--corpus", "corpus", "--out", "run", "--stop-at", "2"] + common)  # a relative path
    assert json.loads((tmp_path / "run" / train.ARGS_FILE).read_text())["corpus"] == str(corpus)
    (corpus / "m9.py").write_text("x = 1\n")
    assert train.main(["--resume", "run"]) == 2
    assert f"--corpus: {corpus} no longer gives the data the run in run trained on" in capsys.readouterr().err
    (corpus / "m9.py").unlink()
    # The same files, from another folder, the corpus written either way.
    monkeypatch.chdir(corpus)
    run(["--resume", str(tmp_path / "run"), "--corpus", ".", "--stop-at", "3"])
    run(["--resume", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / train.STATE_FILE, weights_only=False)["step"] == 4


def small_corpus(folder, files=5):
    folder.mkdir()
    for i in range(files):
        (folder / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i}\n\n" for j in range(30)))
    return folder


PRETRAIN = ["--vocab-size", "300", "--seq-len", "16", "--held-out-fraction", "0.2", "--steps", "4",
            "--eval-every", "2"] + TINY


def test_a_resumed_pretraining_run_refuses_files_whose_contents_changed(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "corpus")
    folder = tmp_path / "run"
    run(["--corpus", str(corpus), "--out", str(folder), "--stop-at", "2"] + PRETRAIN)
    data = json.loads((folder / train.DATA_FILE).read_text())
    held_out = corpus / data["held_out_files"][0]
    trained_on = next(p for p in sorted(corpus.iterdir()) if p.name not in data["held_out_files"])
    for path in (trained_on, held_out):
        # The same functions in the reverse order: other text of the same
        # size, which gives as many tokens.
        text = path.read_text()
        edited = "".join(f"{chunk}\n\n" for chunk in reversed(text.split("\n\n")[:-1]))
        assert edited != text and len(edited) == len(text)
        path.write_text(edited)
        assert train.main(["--resume", str(folder)]) == 2
        assert f"--corpus: {corpus} no longer gives the data the run in {folder} trained on" in \
            capsys.readouterr().err
        path.write_text(text)
    run(["--resume", str(folder)])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 4
    # What data.json records: a sha256 of the sorted 'path<TAB>sha256 of the file's bytes' lines.
    lines = sorted(f"{p.name}\t{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in corpus.iterdir())
    recorded = json.loads((folder / train.DATA_FILE).read_text())["corpus"]["content_sha256"]
    assert recorded == hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_a_pretraining_run_saved_in_the_earlier_format_resumes(tmp_path, capsys):
    # Saved before file contents were hashed and before the options of the
    # other mode were left out: data.json without content hashes (as the
    # bundled default model's), train_args.json with the SFT options' defaults.
    corpus = small_corpus(tmp_path / "corpus")
    folder = tmp_path / "run"
    run(["--corpus", str(corpus), "--out", str(folder), "--stop-at", "2"] + PRETRAIN)
    args = json.loads((folder / train.ARGS_FILE).read_text())
    assert (args["train_examples"], args["eval_examples"], args["accuracy_examples"]) == (None, None, None)
    (folder / train.ARGS_FILE).write_text(json.dumps(
        dict(args, train_examples=200_000, eval_examples=500, accuracy_examples=100)))
    data = json.loads((folder / train.DATA_FILE).read_text())
    for key in ("corpus", "train_files"):
        del data[key]["content_sha256"]
    shipped = json.loads((ROOT / "python" / "llada" / "default_model" / train.DATA_FILE).read_text())
    assert data.keys() == shipped.keys() and data["corpus"].keys() == shipped["corpus"].keys()
    (folder / train.DATA_FILE).write_text(json.dumps(data))
    # What such a data.json records is still compared: a file of another size is refused.
    extra = corpus / "m0.py"
    text = extra.read_text()
    extra.write_text(text + "# more\n")
    assert train.main(["--resume", str(folder)]) == 2
    assert f"--corpus: {corpus} no longer gives the data the run in {folder} trained on" in \
        capsys.readouterr().err
    extra.write_text(text)
    run(["--resume", str(folder), "--stop-at", "3"])
    # Saved again in the present format.
    args = json.loads((folder / train.ARGS_FILE).read_text())
    assert (args["train_examples"], args["eval_examples"], args["accuracy_examples"]) == (None, None, None)
    assert "content_sha256" in json.loads((folder / train.DATA_FILE).read_text())["train_files"]
    run(["--resume", str(folder)])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 4


def test_a_task_run_recorded_with_the_pretraining_defaults_resumes(tmp_path, capsys):
    folder = tmp_path / "run"
    run(SORT + TINY + ["--steps", "4", "--eval-every", "2", "--stop-at", "2", "--out", str(folder)])
    args = json.loads((folder / train.ARGS_FILE).read_text())
    assert (args["seq_len"], args["vocab_size"], args["held_out_fraction"]) == (None, None, None)
    assert (args["train_examples"], args["eval_examples"], args["accuracy_examples"]) == (500, 64, 0)
    # As the bundled task models' train_args.json records them (written before
    # the pretraining options were left out of SFT runs).
    shipped = json.loads((ROOT / "python" / "llada" / "task_models" / "sort" / train.ARGS_FILE).read_text())
    earlier = {name: shipped[name] for name in ("seq_len", "vocab_size", "held_out_fraction")}
    assert earlier == {"seq_len": 256, "vocab_size": 4096, "held_out_fraction": 0.03}
    (folder / train.ARGS_FILE).write_text(json.dumps(dict(args, **earlier)))
    # Given now, even with the recorded value, such an option is refused: the run never used it.
    err = usage_error(["--resume", str(folder), "--seq-len", "256"], capsys)
    assert (f"argument --seq-len: only pretraining (--corpus) runs use it; the run in {folder} is SFT (--task)"
            in err)
    run(["--resume", str(folder), "--stop-at", "3"])
    args = json.loads((folder / train.ARGS_FILE).read_text())
    assert (args["seq_len"], args["vocab_size"], args["held_out_fraction"]) == (None, None, None)
    run(["--resume", str(folder)])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 4


def test_each_mode_takes_the_defaults_of_its_own_options_only(tmp_path):
    args = train.parse_args(["--task", "sort", "--out", str(tmp_path / "a")])
    assert (args.train_examples, args.eval_examples, args.accuracy_examples) == (200_000, 500, 100)
    assert (args.seq_len, args.vocab_size, args.held_out_fraction) == (None, None, None)
    args = train.parse_args(["--corpus", "stdlib", "--out", str(tmp_path / "b"), "--seq-len", "64"])
    assert (args.seq_len, args.vocab_size, args.held_out_fraction) == (64, 4096, 0.03)
    assert (args.train_examples, args.eval_examples, args.accuracy_examples) == (None, None, None)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, packed):
    tok = llada.tasks.tokenizer_for("sort")
    args = train.build_parser().parse_args(TINY)
    cfg = train.build_config(args, tok.get_vocab_size(), special_ids(tok), 64)
    model = llada.LLaDAModel(cfg)
    train.init_weights(model, seed=3)
    llada.model.pack_projections(model, packed)  # shared buffers are saved as separate weights
    train.save_checkpoint(tmp_path, model, tok, {"step": 0}, args, {})
    loaded = llada.load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same code path for both (the fused norm needs no gradient)
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    assert loaded.config.eot_token_id == special_ids(tok)["eot"]
    assert read_tokenizer(tmp_path).get_vocab() == tok.get_vocab()


def test_a_save_never_puts_weights_beside_a_sharded_checkpoint(tmp_path):
    from llada.checkpoint import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "sharded", num_shards=2)
    before = sorted(f.name for f in folder.iterdir())
    tok = llada.tasks.tokenizer_for("sort")
    args = train.build_parser().parse_args(TINY)
    model = llada.LLaDAModel(train.build_config(args, tok.get_vocab_size(), special_ids(tok), 64))
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: holds model.safetensors.index.json"):
        train.save_checkpoint(folder, model, tok, {"step": 0}, args, {})
    assert sorted(f.name for f in folder.iterdir()) == before


def test_resume_continues_the_same_run(tmp_path):
    common = SORT + TINY + ["--steps", "12", "--eval-every", "4", "--save-every", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(common + ["--out", str(straight)])
    run(common + ["--out", str(split), "--stop-at", "6"])
    state = torch.load(split / train.STATE_FILE, weights_only=False)
    assert state["step"] == 6
    run(["--resume", str(split)])
    state = torch.load(split / train.STATE_FILE, weights_only=False)
    assert state["step"] == 12
    assert state["scheduler"]["last_epoch"] == 12
    # Same data order, masks and optimizer moments: the same weights.
    a = llada.load_model(straight, device="cpu")
    b = llada.load_model(split, device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)
    assert [r["step"] for r in log_rows(split)] == [r["step"] for r in log_rows(straight)]


def test_resume_refuses_what_cannot_change_and_applies_the_rest(tmp_path, capsys):
    every = set(vars(train.build_parser().parse_args([])))
    assert set(train.CHANGEABLE_ON_RESUME) <= every
    folder = tmp_path / "run"
    run(SORT + TINY + ["--steps", "6", "--eval-every", "2", "--stop-at", "2", "--out", str(folder)])
    recorded = (folder / train.ARGS_FILE).read_text()
    # Part of the run: refused, also when the new value is the parser's default
    # (--lr 3e-3, --d-model 256, --warmup 100); the run's own value is accepted
    # (--seed 0 here, --lr 1e-2 below).
    for option, name in ((["--lr", "3e-3"], "--lr"), (["--d-model", "256"], "--d-model"),
                         (["--n-layers", "3"], "--n-layers"), (["--task", "add"], "--task"),
                         (["--weight-decay", "0.5"], "--weight-decay"),
                         (["--seed", "0", "--warmup", "100"], "--warmup"), (["--no-weight-tying"], "--weight-tying")):
        err = usage_error(["--resume", str(folder)] + option, capsys)
        assert f"argument {name}: cannot change on --resume" in err
    assert (folder / train.ARGS_FILE).read_text() == recorded
    # --steps 1000 is the default, and still extends the run; the cosine follows the new total.
    run(["--resume", str(folder), "--steps", "1000", "--stop-at", "4", "--lr", "1e-2", "--weight-decay", "0.1"])
    args = json.loads((folder / train.ARGS_FILE).read_text())
    assert (args["steps"], args["stop_at"], args["lr"]) == (1000, 4, 1e-2)
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 4
    row = log_rows(folder)[-1]
    assert row["step"] == "4"
    # Step 4 is 2 steps past the 2-step warm-up: 2/998 of the new cosine
    # (default --min-lr-ratio 0.1), not half of the old 6-step one (0.55).
    assert float(row["lr"]) == pytest.approx(1e-2 * cosine(2 / 998, 0.1), rel=1e-4)
    assert float(row["lr"]) != pytest.approx(1e-2 * cosine(2 / 4, 0.1), rel=1e-4)


def test_resume_without_memory_for_the_training_state_is_one_error_line(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    import llada.checkpoint

    folder = tmp_path / "run"
    run(SORT + TINY + ["--steps", "4", "--eval-every", "2", "--stop-at", "2", "--out", str(folder)])
    params = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    assert 1_000 <= params < 1_000_000  # thousands, so K and kB below
    # A busy machine: room for the float32 weights, but not for their
    # gradients and AdamW's two moments besides (16 bytes a parameter).
    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: params * 12)
    capsys.readouterr()
    with monkeypatch.context() as m:
        # Checked before the training state is read: read, its AdamW moments
        # would be in memory already and count twice.
        m.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("the training state was read first"))
        assert train.main(["--resume", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"llada train: error: --resume: {folder}: the model's {params / 1e3:.2f}K parameters take "
        f"{params * 16 / 1e3:.1f} kB as torch.float32 4 times over, but this machine has "
        f"{params * 12 / 1e3:.1f} kB of memory available (training keeps the weights, their gradients "
        f"and AdamW's two moments in float32)\n")
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 2  # the run is as it was
    # An allocation that fails anywhere else in training is no traceback either.
    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: None)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(train, "make_optimizer", no_memory)
    assert train.main(["--resume", str(folder)]) == 2
    assert capsys.readouterr().err == "llada train: error: out of memory\n"


def test_a_new_run_without_memory_for_its_training_state_is_refused_before_training(tmp_path, monkeypatch,
                                                                                   capsys):
    import llada.checkpoint

    monkeypatch.setattr(llada.checkpoint, "_available_host_memory", lambda: 1000)
    folder = tmp_path / "run"
    capsys.readouterr()
    assert train.main(SORT + TINY + ["--steps", "4", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llada train: error: the model of --d-model, --n-layers, --mlp-hidden, --vocab-size "
                          "and --weight-tying: the model's ")
    assert err.endswith(" 4 times over, but this machine has 1.0 kB of memory available (training keeps the "
                        "weights, their gradients and AdamW's two moments in float32)\n")
    assert not (folder / "model.safetensors").exists()


@pytest.mark.parametrize("saved, given", [(None, "."), ("stdlib", "./stdlib"), ("stdlib", "stdlib/")])
def test_a_resumed_corpus_path_is_never_the_runs_keyword_or_its_lack_of_corpus(tmp_path, monkeypatch, capsys,
                                                                               saved, given):
    # "." resolves to where the command runs, as does a missing corpus read
    # as a path; ./stdlib is a folder of that name, not the standard library.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "mine.py").write_text("x = 1\n")
    folder = tmp_path / "run"
    folder.mkdir()
    recorded = dict(vars(train.build_parser().parse_args([])), corpus=saved, out=str(folder),
                    task=None if saved else "sort")
    (folder / train.ARGS_FILE).write_text(json.dumps(recorded))
    (folder / train.STATE_FILE).write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", "run", "--corpus", given])
    assert (f"argument --corpus: cannot change on --resume: the run in run has {saved!r}, not {given!r}"
            in capsys.readouterr().err)


def test_resumed_steps_take_the_new_schedules_lr(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    run(SORT + TINY + ["--steps", "6", "--eval-every", "100", "--stop-at", "3", "--out", str(folder)])
    used = []
    adamw_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(["--resume", str(folder), "--steps", "1000", "--stop-at", "5"])
    # The step from s to s + 1 takes lr_factor(s) of the schedule as it is now
    # (1000 steps), from the first resumed step on: the saved optimizer holds
    # the 6-step schedule's value for step 3 (0.87 of the peak).
    want = [1e-2 * cosine((s - 2) / 998, 0.1) for s in (3, 4)]
    assert used == pytest.approx(want, rel=1e-6)
    assert used[0] != pytest.approx(1e-2 * cosine(1 / 4, 0.1), rel=1e-3)


def test_stop_at_is_checked_and_always_leaves_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "run"
    common = SORT + TINY + ["--steps", "3", "--out", str(folder)]
    assert "argument --stop-at: expected an int >= 0, got -1" in usage_error(common + ["--stop-at", "-1"], capsys)
    assert "argument --stop-at: 4 is past --steps (3)" in usage_error(common + ["--stop-at", "4"], capsys)
    assert not folder.exists()
    run(common + ["--stop-at", "2", "--eval-every", "100", "--save-every", "100"])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 2
    assert train.main(["--resume", str(folder), "--stop-at", "2"]) == 2
    assert "--stop-at: 2 is not after the run's step 2" in capsys.readouterr().err
    run(["--resume", str(folder)])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 3


def test_resumed_run_logs_the_same_train_loss(tmp_path):
    common = SORT + TINY + ["--steps", "6", "--eval-every", "2", "--save-every", "100"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(common + ["--out", str(straight)])
    run(common + ["--out", str(split), "--stop-at", "3"])  # mid-way between two evaluations
    run(["--resume", str(split)])
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]
    assert [[r[k] for k in fields] for r in log_rows(split)] == [[r[k] for k in fields] for r in log_rows(straight)]


def test_lr_schedule_warms_up_then_decays():
    f = [train.lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to 1
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    # Cosine, not linear (a linear decay gives 0.775 and 0.325 at the quarters).
    assert f[10] == pytest.approx(1.0)
    assert f[35] == pytest.approx(0.1 + 0.45 * (1 + 0.5 ** 0.5))  # a quarter of the decay: 0.868
    assert f[60] == pytest.approx(0.55)
    assert f[85] == pytest.approx(0.1 + 0.45 * (1 - 0.5 ** 0.5))  # three quarters: 0.232
    assert f[10:111] == pytest.approx([cosine(k / 100, 0.1) for k in range(101)])
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    g = [train.lr_factor(s, warmup=4, total=12, min_ratio=0.0) for s in range(14)]
    assert g[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert g[4:] == pytest.approx([cosine(k / 8, 0.0) for k in range(8)] + [0.0, 0.0])
    assert g[8] == pytest.approx(0.5)


NEW_SORT = ["--task", "sort", "--out", "{out}"]
ONLY_PRETRAINING = r"argument --{}: only pretraining \(--corpus\) runs use it; this run is SFT \(--task\)"
ONLY_SFT = r"argument --{}: only SFT \(--task\) runs use it; this run is pretraining \(--corpus\)"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{out}"], "give exactly one of --corpus .* or --task"),
        (NEW_SORT + ["--corpus", "stdlib"], "give exactly one of --corpus .* or --task"),
        (["--task", "sort"], "argument --out: an output folder is required"),
        (NEW_SORT + ["--steps", "0"], "argument --steps: expected a positive int, got 0"),
        (["--task", "perm", "--out", "{out}"], "argument --train-examples: task 'perm' has 151200 distinct "
                                               r"prompts; with --eval-examples 500 held out, at most 150700, "
                                               "got 200000"),
        (["--task", "add", "--out", "{out}", "--eval-examples", "1000000"], "argument --eval-examples: task "
                                                                             "'add' has 1000000 distinct"),
        (["--task", "nope", "--out", "{out}"], "argument --task: invalid choice"),
        (["--resume", "{tmp}"], "argument --resume: .* has no train_args.json"),
        (NEW_SORT + ["--device", "foo"], "argument --device: expected cpu or cuda"),
        (NEW_SORT + ["--device", "cuda"], "argument --device: cuda: no CUDA GPU"),
        (NEW_SORT + ["--mlp-hidden", "-5"], "argument --mlp-hidden: expected an int >= 0, got -5"),
        (NEW_SORT + ["--d-model", "30"], "argument --d-model: 30 is not --n-heads"),
        (NEW_SORT + ["--train-examples", "0"], "argument --train-examples: expected a positive int"),
        (NEW_SORT + ["--eval-examples", "0"], "argument --eval-examples: expected a positive int"),
        (NEW_SORT + ["--accuracy-examples", "-1"], "argument --accuracy-examples: expected an int >= 0"),
        (NEW_SORT + ["--min-lr-ratio", "5"], r"argument --min-lr-ratio: expected a value in \[0, 1\], got 5"),
        (NEW_SORT + ["--weight-decay", "-1"], "argument --weight-decay: expected a finite value >= 0"),
        (NEW_SORT + ["--lr", "nan"], "argument --lr: expected a finite value > 0, got nan"),
        (NEW_SORT + ["--seed", "-1"], "argument --seed"),
        (["--corpus", "{tmp}", "--out", "{out}", "--held-out-fraction", "1"], "argument --held-out-fraction"),
        (["--corpus", "{tmp}", "--out", "{out}", "--vocab-size", "10"], "argument --vocab-size: expected at least"),
        # Beyond a C int, torch and the tokenizer trainer would fail naming no flag.
        (["--corpus", "{tmp}", "--out", "{out}", "--vocab-size", str(10**20)],
         f"argument --vocab-size: expected at most 2147483647, got {10**20}"),
        (NEW_SORT + ["--batch-size", str(10**20)], f"argument --batch-size: expected at most 2147483647, got {10**20}"),
        (NEW_SORT + ["--mlp-hidden", str(10**20)], f"argument --mlp-hidden: expected at most 2147483647, got {10**20}"),
        # The options of the other mode, which it would ignore, whatever their value (the default too).
        (NEW_SORT + ["--seq-len", "64"], ONLY_PRETRAINING.format("seq-len")),
        (NEW_SORT + ["--seq-len", "-5"], ONLY_PRETRAINING.format("seq-len")),
        (NEW_SORT + ["--vocab-size", "4096"], ONLY_PRETRAINING.format("vocab-size")),
        (NEW_SORT + ["--held-out-fraction", "7"], ONLY_PRETRAINING.format("held-out-fraction")),
        (["--corpus", "{tmp}", "--out", "{out}", "--train-examples", "-3"], ONLY_SFT.format("train-examples")),
        (["--corpus", "{tmp}", "--out", "{out}", "--eval-examples", "500"], ONLY_SFT.format("eval-examples")),
        (["--corpus", "stdlib", "--out", "{out}", "--accuracy-examples", "0"], ONLY_SFT.format("accuracy-examples")),
    ],
)
def test_bad_arguments_are_named(tmp_path, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.replace("{out}", str(tmp_path / "out")).replace("{tmp}", str(tmp_path)) for a in argv]
    assert re.search("llada train: error: " + message, usage_error(argv, capsys))
    assert not (tmp_path / "out").exists()


def test_bad_run_arguments_are_named(tmp_path, capsys):
    # A corpus of one file: that file is held out, nothing is left to train on.
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "only.py").write_text("x = 1\n" * 50)
    argv = ["--corpus", str(tmp_path / "corpus"), "--vocab-size", "300", "--seq-len", "8", "--out",
            str(tmp_path / "run")] + TINY
    assert train.main(argv) == 2
    assert re.search(r"--corpus: the training split is empty.*\(only\.py\)", capsys.readouterr().err)
    # --resume writes where the run is; another --out is refused, not dropped.
    run(SORT + TINY + ["--steps", "4", "--stop-at", "2", "--out", str(tmp_path / "run")])
    err = usage_error(["--resume", str(tmp_path / "run"), "--out", str(tmp_path / "other")], capsys)
    assert "argument --out: --resume" in err
    assert not (tmp_path / "other").exists()
    assert train.main(["--task", "add", "--max-len", "4", "--out", str(tmp_path / "short")] + TINY) == 2
    assert "--max-len: 4 is shorter than the data's sequences" in capsys.readouterr().err
    # A file is no folder; a folder under a file cannot be made: named before training, no traceback.
    (tmp_path / "notes.txt").write_text("mine")
    err = usage_error(SORT + TINY + ["--out", str(tmp_path / "notes.txt")], capsys)
    assert "argument --out: " in err and "notes.txt is a file, not a folder" in err
    assert train.main(SORT + TINY + ["--steps", "2", "--out", str(tmp_path / "notes.txt" / "run")]) == 2
    assert "llada train: error: " in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # A damaged resume state is named.
    (tmp_path / "run" / train.STATE_FILE).write_bytes(b"garbage")
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    assert f"{train.STATE_FILE}: cannot be read" in capsys.readouterr().err


def test_a_new_run_never_writes_into_a_folder_in_use(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    argv = ["--task", "sort", "--out", str(tmp_path)]
    assert re.search("argument --out: .* is not empty", usage_error(argv, capsys))
    assert (tmp_path / "config.json").read_text() == "{}"


def test_default_model_loads_and_generates():
    path = train.default_model_path()
    if not (Path(path) / "model.safetensors").is_file():
        pytest.skip("the default model is not bundled in this checkout")
    model = llada.load_model(path, device="cpu")
    tok = llada.load_tokenizer(path)
    ids = tok("def fibonacci(n):")["input_ids"]
    assert tok.bos_token_id not in ids  # prompts are bare text, like mid-file windows
    out = llada.generate(model, torch.tensor([ids]), steps=8, gen_length=8, block_length=8)
    assert out.shape == (1, len(ids) + 8)
    assert (out[0, len(ids):] != model.config.mask_token_id).all()
    assert isinstance(tok.decode(out[0, len(ids):].tolist()), str)
    info = json.loads((Path(path) / train.DATA_FILE).read_text())
    assert info["corpus"]["files"] > 0 and len(info["corpus"]["sha256"]) == 64


def test_ctrl_c_stops_after_the_step_saved_and_resume_continues(tmp_path, monkeypatch):
    common = SORT + TINY + ["--steps", "10", "--eval-every", "5", "--save-every", "100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(common + ["--out", str(straight)])
    calls = []
    loss = train.compute_loss

    def interrupted_in_step_4(model, *args, **kwargs):
        calls.append(model.training)  # the held-out evaluations run in eval mode
        if calls.count(True) == 4:  # as if Ctrl-C came in the middle of step 4
            os.kill(os.getpid(), signal.SIGINT)
        return loss(model, *args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", interrupted_in_step_4)
    before = signal.getsignal(signal.SIGINT)
    run(common + ["--out", str(stopped)])
    assert torch.load(stopped / train.STATE_FILE, weights_only=False)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C means what it meant before
    monkeypatch.setattr(train, "compute_loss", loss)
    run(["--resume", str(stopped)])
    a = llada.load_model(straight, device="cpu")
    b = llada.load_model(stopped, device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)


def same_weights(a, b):
    return all(torch.equal(pa, pb) for pa, pb in zip(llada.load_model(a, device="cpu").state_dict().values(),
                                                      llada.load_model(b, device="cpu").state_dict().values()))


def test_ctrl_c_in_the_first_evaluation_leaves_a_run_to_resume(tmp_path, monkeypatch):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(common + ["--out", str(straight)])
    evaluate = train.evaluate_loss

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the step-0 evaluation runs
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_loss", interrupted)
    run(common + ["--out", str(stopped)])
    assert torch.load(stopped / train.STATE_FILE, weights_only=False)["step"] == 0
    monkeypatch.setattr(train, "evaluate_loss", evaluate)
    run(["--resume", str(stopped)])
    assert same_weights(straight, stopped)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]  # (not the time taken)
    assert [[r[k] for k in fields] for r in log_rows(stopped)] == [[r[k] for k in fields] for r in log_rows(straight)]
    assert [r["step"] for r in log_rows(stopped)] == ["0", "2", "4"]


def test_a_run_killed_before_its_first_save_resumes_from_the_start(tmp_path, monkeypatch):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(common + ["--out", str(straight)])
    loss, calls = train.compute_loss, []

    def killed_in_step_2(model, *args, **kwargs):
        calls.append(model.training)
        if calls.count(True) == 2:
            raise KeyboardInterrupt  # a second Ctrl-C: no save on the way out
        return loss(model, *args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", killed_in_step_2)
    assert train.main(common + ["--out", str(killed)]) == 130
    assert torch.load(killed / train.STATE_FILE, weights_only=False)["step"] == 0
    monkeypatch.setattr(train, "compute_loss", loss)
    run(["--resume", str(killed)])
    assert same_weights(straight, killed)


def test_a_run_killed_in_its_first_evaluation_resumes_from_the_start(tmp_path, monkeypatch):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(common + ["--out", str(straight)])

    def killed_in_the_evaluation(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl-C (or a kill) while the step-0 evaluation runs

    monkeypatch.setattr(train, "evaluate_loss", killed_in_the_evaluation)
    assert train.main(common + ["--out", str(killed)]) == 130
    assert torch.load(killed / train.STATE_FILE, weights_only=False)["step"] == 0
    monkeypatch.undo()
    run(["--resume", str(killed)])
    assert same_weights(straight, killed)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]
    assert [[r[k] for k in fields] for r in log_rows(killed)] == [[r[k] for k in fields] for r in log_rows(straight)]


def test_ctrl_c_in_the_first_save_stops_before_the_first_evaluation(tmp_path, monkeypatch):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(common + ["--out", str(straight)])
    save, evaluate, evaluations = train.save_weights, train.evaluate_loss, []

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the step-0 save is written
        return save(*args, **kwargs)

    def counted(*args, **kwargs):
        evaluations.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "save_weights", interrupted)
    monkeypatch.setattr(train, "evaluate_loss", counted)
    run(common + ["--out", str(stopped)])
    assert evaluations == [] and log_rows(stopped) == []  # stopped without waiting for the evaluation
    assert torch.load(stopped / train.STATE_FILE, weights_only=False)["step"] == 0
    monkeypatch.undo()
    run(["--resume", str(stopped)])  # which evaluates step 0 first
    assert same_weights(straight, stopped)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]
    assert [[r[k] for k in fields] for r in log_rows(stopped)] == [[r[k] for k in fields] for r in log_rows(straight)]


def test_a_new_run_whose_first_save_fails_starts_over_with_the_same_command(tmp_path, monkeypatch, capsys):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    run(common + ["--out", str(straight)])

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert train.main(common + ["--out", str(failed)]) == 2
    assert capsys.readouterr().err.endswith(
        f"llada train: error: {failed}: the save failed ([enforce fail at inline_container.cc:672] . unexpected "
        "pos 1234 vs 1200); there is no earlier save to keep; the same command starts the run over\n")
    monkeypatch.undo()
    run(common + ["--out", str(failed)])
    assert same_weights(straight, failed)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]
    assert [[r[k] for k in fields] for r in log_rows(failed)] == [[r[k] for k in fields] for r in log_rows(straight)]


@pytest.mark.parametrize("cut_off", ["while writing", "between renames"])
def test_a_first_save_cut_off_starts_over_with_the_same_command(tmp_path, monkeypatch, capsys, cut_off):
    common = SORT + TINY + ["--steps", "4", "--eval-every", "2", "--save-every", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(common + ["--out", str(straight)])
    if cut_off == "while writing":
        dump = json.dump

        def killed_in_train_args(obj, f, **kwargs):
            if Path(f.name).name == train.ARGS_FILE:
                raise KeyboardInterrupt
            return dump(obj, f, **kwargs)

        monkeypatch.setattr(json, "dump", killed_in_train_args)
        # As when killed outright: nothing cleans up the staging folder.
        monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    else:
        replace = os.replace

        def killed_after_the_config(src, dst):
            replace(src, dst)
            if Path(dst).name == "config.json":
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", killed_after_the_config)
    assert train.main(common + ["--out", str(killed)]) == 130
    monkeypatch.undo()
    left = sorted(p.name for p in killed.iterdir())
    assert left == ([train.STAGING_DIR, train.LOG_FILE] if cut_off == "while writing"
                    else [train.STAGING_DIR, "config.json", train.LOG_FILE])
    assert re.search(f"argument --resume: the run in {re.escape(str(killed))} stopped before its first save, so "
                     "there is nothing to resume; start it over with the command that started it",
                     usage_error(["--resume", str(killed)], capsys))
    run(common + ["--out", str(killed)])
    assert not (killed / train.STAGING_DIR).exists()
    assert same_weights(straight, killed)
    assert [r["step"] for r in log_rows(killed)] == ["0", "2", "4"]


@pytest.mark.parametrize("contents", [
    {"config.json": "{}"},
    {train.LOG_FILE: ",".join(train.LOG_FIELDS) + "\r\n0,3e-05,,2.6,,0,0\r\n"},  # a run's log with a row
    {train.LOG_FILE: ",".join(train.LOG_FIELDS) + "\r\n", "notes.txt": "mine"},
    {train.STAGING_DIR + "/model.safetensors": "", "notes.txt": "mine"},
    {train.STAGING_DIR: "a file, not a staging folder"},
    {"config.json": "{}", train.LOG_FILE: ",".join(train.LOG_FIELDS) + "\r\n"},  # no staging folder beside it
    {train.STAGING_DIR + "/x": "", train.STATE_FILE: "a run's state", train.LOG_FILE: ",".join(train.LOG_FIELDS)},
])
def test_a_new_run_never_writes_over_what_it_did_not_leave_before_a_first_save(tmp_path, capsys, contents):
    folder = tmp_path / "out"
    for name, text in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, newline="")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    argv = SORT + TINY + ["--steps", "2", "--out", str(folder)]
    assert re.search("argument --out: .* is not empty", usage_error(argv, capsys))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_the_files_a_save_renames_before_its_state_are_known(tmp_path):
    run(SORT + TINY + ["--steps", "1", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(train.SAVED_FILES + (train.STATE_FILE,
                                                                                    train.LOG_FILE))


def test_a_resumed_run_drops_the_rows_logged_after_its_save(tmp_path):
    # As when a run is killed: the log holds rows past the last save.
    common = SORT + TINY + ["--steps", "10", "--eval-every", "2", "--save-every", "100"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(common + ["--out", str(straight)])
    run(common + ["--out", str(killed), "--stop-at", "4"])
    ahead = tmp_path / "ahead"
    shutil.copytree(killed, ahead)
    run(["--resume", str(ahead), "--stop-at", "8"])
    shutil.copy(ahead / train.LOG_FILE, killed / train.LOG_FILE)  # rows 6 and 8, past the save at 4
    run(["--resume", str(killed)])
    assert same_weights(straight, killed)
    fields = ["step", "lr", "train_loss", "eval_loss", "tokens"]
    assert [[r[k] for k in fields] for r in log_rows(killed)] == [[r[k] for k in fields] for r in log_rows(straight)]


def test_a_diverged_run_stops_with_its_last_save_kept(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    loss, calls = train.compute_loss, []

    def nan_in_step_3(model, *args, **kwargs):
        calls.append(model.training)
        value = loss(model, *args, **kwargs)
        return value * math.nan if calls.count(True) == 3 else value

    monkeypatch.setattr(train, "compute_loss", nan_in_step_3)
    assert train.main(SORT + TINY + ["--steps", "6", "--eval-every", "2", "--save-every", "2",
                                      "--out", str(folder)]) == 2
    assert "llada train: error: the training loss is nan at step 3; the last save (step 2) is kept" in \
        capsys.readouterr().err
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 2
    model = llada.load_model(folder, device="cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ctrl_c_while_preparing_the_data_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(args, tok=None):
        raise KeyboardInterrupt  # Ctrl-C before the training loop handles it

    monkeypatch.setattr(train, "Data", interrupted)
    assert train.main(SORT + TINY + ["--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == "\nllada train: interrupted\n"


def test_a_corpus_file_name_that_is_not_utf8_is_named_before_training(tmp_path, monkeypatch, capsys):
    corpus = small_corpus(tmp_path / "corpus")
    try:  # Latin-1 "cafe" with an acute e
        with open(os.path.join(os.fsencode(corpus), b"caf\xe9.py"), "wb") as f:
            f.write(b"x = 1\n")
    except OSError:
        pytest.skip("this filesystem refuses names that are not UTF-8")
    if os.fsencode(corpus / os.fsdecode(b"caf\xe9.py")) not in {os.fsencode(p) for p in corpus.iterdir()}:
        pytest.skip("this filesystem changes names that are not UTF-8")

    def not_reached(*args, **kwargs):
        raise AssertionError("the tokenizer was trained")

    monkeypatch.setattr(llada.tokenizer, "train_bpe", not_reached)
    assert train.main(["--corpus", str(corpus), "--out", str(tmp_path / "run")] + PRETRAIN) == 2
    assert capsys.readouterr().err == (f"llada train: error: --corpus: the file name {corpus}/caf\\xe9.py is not "
                                       "UTF-8; rename the file, or move it out of the corpus\n")


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    def fails(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes.\nmore")

    monkeypatch.setattr(train, "train", fails)
    assert train.main(SORT + TINY + ["--out", "unused"]) == 2
    assert capsys.readouterr().err == ("llada train: error: out of memory (DefaultCPUAllocator: can't allocate "
                                       "memory: you tried to allocate 9 bytes.)\n")


def test_a_failed_save_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    run(SORT + TINY + ["--steps", "6", "--eval-every", "2", "--save-every", "2", "--stop-at", "2", "--out",
                       str(folder)])
    saved = {f.name: f.read_bytes() for f in folder.iterdir()}

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(torch, "save", disk_full)
    assert train.main(["--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"llada train: error: {folder}: the save failed (" in err and "the previous save is kept" in err
    assert sorted(f.name for f in folder.iterdir()) == sorted(saved)  # no .tmp left
    for name in (train.STATE_FILE, "model.safetensors"):
        assert (folder / name).read_bytes() == saved[name]


def test_a_save_cut_off_while_writing_keeps_every_file_of_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    common = SORT + TINY + ["--steps", "6", "--eval-every", "2", "--save-every", "2"]
    run(common + ["--stop-at", "2", "--out", str(folder)])
    saved = {f.name: f.read_bytes() for f in folder.iterdir() if f.name != train.LOG_FILE}
    dump = json.dump

    def cut_off_in_train_args(obj, f, **kwargs):
        if Path(f.name).name == train.ARGS_FILE:
            f.write(json.dumps(obj, **kwargs)[:40])  # part of it is out when a second Ctrl-C lands
            raise KeyboardInterrupt
        return dump(obj, f, **kwargs)

    monkeypatch.setattr(json, "dump", cut_off_in_train_args)
    assert train.main(["--resume", str(folder), "--stop-at", "4"]) == 130
    monkeypatch.setattr(json, "dump", dump)
    assert {f.name: f.read_bytes() for f in folder.iterdir() if f.name != train.LOG_FILE} == saved
    run(["--resume", str(folder)])
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 6


def test_weights_and_state_of_different_saves_do_not_resume(tmp_path, monkeypatch, capsys):
    # A save cut off between renaming its files into place: the weights are
    # step 4's, the optimizer state and step still step 2's.
    folder = tmp_path / "run"
    common = SORT + TINY + ["--steps", "6", "--eval-every", "2", "--save-every", "2"]
    run(common + ["--stop-at", "2", "--out", str(folder)])
    step_2_weights = (folder / "model.safetensors").read_bytes()
    replace = os.replace

    def cut_off_after_the_weights(src, dst):
        replace(src, dst)
        if Path(dst) == folder / "model.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", cut_off_after_the_weights)
    assert train.main(["--resume", str(folder), "--stop-at", "4"]) == 130
    monkeypatch.setattr(os, "replace", replace)
    assert (folder / "model.safetensors").read_bytes() != step_2_weights
    assert torch.load(folder / train.STATE_FILE, weights_only=False)["step"] == 2
    capsys.readouterr()
    assert train.main(["--resume", str(folder)]) == 2
    assert (f"llada train: error: {folder}: model.safetensors and {train.STATE_FILE} (step 2) come from "
            f"different saves") in capsys.readouterr().err
    # Put back step 2's weights, and the pair resumes.
    (folder / "model.safetensors").write_bytes(step_2_weights)
    run(["--resume", str(folder)])


def test_random_windows_start_anywhere_a_window_fits():
    # 10 tokens, windows of 4: starts 0..6, so the last token is in some window.
    windows = train.random_windows(torch.arange(10, dtype=torch.int32), 2000, 4, torch.Generator().manual_seed(0))
    assert sorted(set(windows[:, 0].tolist())) == list(range(7))
    assert all(row == list(range(row[0], row[0] + 4)) for row in windows.tolist())
    # A stream of exactly one window is that window.
    one = train.random_windows(torch.arange(4, dtype=torch.int32), 3, 4, torch.Generator().manual_seed(0))
    assert one.tolist() == [[0, 1, 2, 3]] * 3
    with pytest.raises(ValueError, match="seq_len: 5 is longer than the token stream"):
        train.random_windows(torch.arange(4, dtype=torch.int32), 1, 5, torch.Generator())


def test_special_token_strings_in_a_corpus_file_are_plain_text(tmp_path):
    # Code about tokenizers spells the special tokens out; in the training
    # stream they are characters like any others: no mask id to learn as a
    # target, no EOS or BOS inside a file, and the text decodes back exactly.
    from llada.checkpoint import SPECIAL_TOKENS
    from llada.tokenizer import train_bpe

    text = "".join(f'{kind.upper()} = "{token}"\n' for kind, token in SPECIAL_TOKENS.items())
    text += "def f(x):\n    return x\n" * 20
    path = tmp_path / "tok.py"
    path.write_text(text)
    tok = train_bpe([text], 300)
    ids = special_ids(tok)
    stream = train.token_stream(tok, [path, path], ids["bos"], ids["eos"]).tolist()
    assert len(stream) % 2 == 0
    one = stream[: len(stream) // 2]
    assert one == stream[len(stream) // 2 :]
    assert one[0] == ids["bos"] and one[-1] == ids["eos"]
    assert not set(one[1:-1]) & set(ids.values())
    assert tok.decode(one[1:-1], skip_special_tokens=False) == text
    # The tokenizer is left as it was: a special token typed in a prompt is that token.
    assert tok.encode(SPECIAL_TOKENS["mask"], add_special_tokens=False).ids == [ids["mask"]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_model_writes_files_anyone_may_read(tmp_path, monkeypatch, dtype):
    import runpy
    import sys

    from safetensors.torch import load_file

    folder, dest = tmp_path / "run", tmp_path / "model"
    run(SORT + TINY + ["--steps", "2", "--eval-every", "2", "--out", str(folder)])
    monkeypatch.setattr(sys, "argv", ["export_model.py", str(folder), str(dest), "--dtype", dtype])
    umask = os.umask(0o022)
    try:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "export_model.py"),
                       run_name="__main__")
    finally:
        os.umask(umask)
    # As every other new file under umask 022 (the run's own copy included): rw-r--r--.
    assert oct((dest / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    src, got = load_file(folder / "model.safetensors"), load_file(dest / "model.safetensors")
    assert sorted(src) == sorted(got)
    assert all(torch.equal(src[k].to(getattr(torch, dtype)), got[k]) for k in src)
    assert (dest / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert not (dest / train.STATE_FILE).exists()
    # Never beside a sharded model's index: the folder would hold two sets of weights.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["export_model.py", str(folder), str(sharded)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "export_model.py"),
                       run_name="__main__")
    assert stopped.value.code == 2 and sorted(p.name for p in sharded.iterdir()) == ["model.safetensors.index.json"]


def export_model(monkeypatch, capsys, *argv) -> str:
    """Runs scripts/export_model.py, which must refuse as argparse does; its error line."""
    import runpy
    import sys

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["export_model.py", *map(str, argv)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "export_model.py"),
                       run_name="__main__")
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_export_model_refuses_a_run_folder_as_destination_before_writing(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run(SORT + TINY + ["--steps", "2", "--eval-every", "2", "--out", str(run_dir)])

    def contents(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    before = contents(run_dir)
    (tmp_path / "link").symlink_to(run_dir)
    for dest in (run_dir, run_dir / ".." / "run", tmp_path / "link"):
        assert export_model(monkeypatch, capsys, run_dir, dest, "--dtype", "bfloat16") == (
            f"export_model.py: error: dest: {dest} is the run folder itself; export into another folder")
    # Another run's folder: its float32 weights belong with its resume state.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    assert export_model(monkeypatch, capsys, run_dir, other) == (
        f"export_model.py: error: dest: {other} holds {train.STATE_FILE} (a training run); export into another folder")
    assert contents(run_dir) == before and contents(other) == before
    # A run folder without one of the files the export copies: nothing is written.
    (other / "data.json").unlink()
    dest = tmp_path / "model"
    assert export_model(monkeypatch, capsys, other, dest) == (
        f"export_model.py: error: run: {other} has no data.json; expected a folder written by llada train")
    assert not dest.exists()
    assert train.main(["--resume", str(run_dir), "--steps", "3"]) == 0  # the run still resumes


ROOT = Path(__file__).resolve().parent.parent

# Runs scripts/run_without_extension.py as on a machine where the extension
# was never built: importing llada._C fails.
WITHOUT_EXTENSION = """
import runpy, sys
class NotBuilt:
    def find_spec(self, name, path=None, target=None):
        if name == "llada._C":
            raise ModuleNotFoundError("No module named 'llada._C'")
sys.meta_path.insert(0, NotBuilt())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_run_without_extension_trains_where_the_extension_is_not_built(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTENSION, str(ROOT / "scripts" / "run_without_extension.py"),
         "--task", "add", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--steps", "2",
         "--batch-size", "8", "--train-examples", "100", "--eval-examples", "10", "--accuracy-examples", "4",
         "--eval-every", "2", "--save-every", "2", "--device", "cpu", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr
    assert "step 2: train" in done.stdout and " acc " in done.stdout  # decoding ran too, on the references
    model = llada.load_model(out, device="cpu")  # with the extension: the same checkpoint format
    assert model.config.n_layers == 1


def _sass_loop(opcode: str) -> str:
    """A disassembled loop whose body holds one ``opcode`` instruction."""
    return "\n".join([
        "        /*0100*/                   IMAD R1, R2, R3, RZ ;",
        f"        /*0110*/                   {opcode} ;",
        "        /*0120*/                   IADD3 R4, R4, 0x1, RZ ;",
        "        /*0130*/               @P0 BRA 0x100 ;",
    ])


@pytest.mark.parametrize("opcode, mma", [("HGMMA.64x128x16.F32 R88, gdesc[UR16], R88", 1),
                                         ("UTMALDG.4D [UR8], [UR14]", 0),
                                         ("HMMA.16816.F32 R4, R8, R12, R4", 1),
                                         ("LDG.E.128 R4, desc[UR4][R2.64]", 0)])
def test_sass_loop_stats_counts_hopper_mmas_and_tma_loads(opcode, mma):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sass_loop_stats", ROOT / "scripts" / "sass_loop_stats.py")
    stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stats)
    loop = stats.main_loop(_sass_loop(opcode))
    assert loop is not None and sum(loop.values()) == 4
    assert sum(loop[op] for op in stats.MMAS) == mma
    assert stats.main_loop(_sass_loop("FMUL R1, R2, R3")) is None  # no MMA nor global load: no main loop
