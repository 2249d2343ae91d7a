"""The command-line fuzz (tests/fuzz.py): its seeded sweep over train.py and tools/ finds
nothing, and its judge flags each way a command can fail its users."""
import os

import pytest

import fuzz


def test_command_line_fuzz(tmp_path, toy_root):
    findings, outcomes = fuzz.sweep(0, fuzz.CI_VECTORS, str(tmp_path), toy_root)
    assert not findings, fuzz.summary(findings, outcomes, 0)
    assert sum(outcomes.values()) == fuzz.CI_VECTORS
    assert {target for target, _ in outcomes} == set(fuzz.TARGETS)  # every script ran
    exits = {code: sum(n for (_, c), n in outcomes.items() if c == code) for code in (0, 2)}
    assert exits[0] >= 40 and exits[2] >= 100, outcomes  # both sides of the property
    assert os.listdir(tmp_path) == ["world"]  # each vector's folder is gone after it


@pytest.mark.parametrize("code, err, crash, problem", [
    (2, "usage: train.py [-h]\ntrain.py: error: argument --seed: ...", None, None),
    (2, "a warning\nerror: --out x holds files that train.py did not write", None, None),
    (1, "error: the loss is nan at epoch 2/2, batch 1/1: ...", None, None),
    (None, "", ("Traceback ...", "KeyError: 'method'"), "escaped: KeyError: 'method'"),
    (2, "Traceback (most recent call last):\n  ...\nerror: x", None, "a traceback was printed"),
    (2, "error: the state dict does not fit:\n\tsize mismatch for ...", None, "the last line"),
    (2, "error: one\nerror: two", None, "2 error lines"),
    (2, "error: 'NoneType' object has no attribute 'get'", None, "Python's own text"),
    (2, "train.py: error: argument --epochs: invalid parse value: 'x'", None, "Python's own"),
    (1, "error: --out x: cannot write there", None, "exit 1"),
    (3, "", None, "exit 3"),
])
def test_judge(tmp_path, code, err, crash, problem):
    problems = fuzz.judge("train", [], code, "", err, crash, str(tmp_path))
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_judge_refusal_after_training_started(tmp_path):
    out = "epoch [1/2] batch [1/1] loss 1.0 acc 50.0 lr 1e-05 eta 0:00:00\n"
    late = fuzz.judge("train", [], 2, out, "error: --ctx-init x is not ...", None, str(tmp_path))
    assert any("refused after training started" in p for p in late)
    assert fuzz.judge("train", [], 2, out, "error: cannot write x/checkpoint.pt (No space left "
                      "on device): free some space or pass another --out", None,
                      str(tmp_path)) == []


def test_run_files_left_behind_by_a_refusal_are_found(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "learned.pt").write_bytes(b"before")
    before = fuzz.run_files(str(tmp_path))
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "results.json").write_text("{}")
    assert fuzz.aftermath(None, "predict", [], 2, str(tmp_path), before, 10) == [
        f"left {os.path.join('new', 'results.json')} after exit 2"]
    assert fuzz.aftermath(None, "predict", [], 0, str(tmp_path), before, 10) == []


def test_special_tokens_in_user_words_are_refused_where_parsed(tmp_path, capsys):
    # "<|endoftext|>" in a prompt is encoded as EOT, where the text feature would be read
    import argparse
    import data
    import train
    from conftest import folder_dataset
    from tools import predict
    for flag in ("--ctx-init", "--template"):
        with pytest.raises(SystemExit):
            train.parser.parse_args([flag, "a <|endoftext|> {}"])
        assert "holds CLIP's special token" in capsys.readouterr().err
    folder_dataset(tmp_path / "pets", ["cat", "dog &lt;|startoftext|&gt;"])  # HTML-escaped too
    with pytest.raises(data.DataError, match="class name 'dog &lt;.*special token"):
        data.load("folder", tmp_path / "pets")
    args = argparse.Namespace(classes="cat,<|endoftext|>", classes_file=None)
    with pytest.raises(predict.UsageError, match="special token"):
        predict.class_list(args, {"method": "zeroshot"})
