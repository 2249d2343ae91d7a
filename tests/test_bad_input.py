"""Bad input is refused before the work, with a message that names what to change; nothing a
finished or interrupted run holds is lost (tiny folder datasets, a tiny random CLIP, CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import runs
import train
from runs import UsageError
from conftest import folder_dataset, make_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    long_name = "zebra " + "7" * 80  # 81 tokens (one per digit), sorts last: a new class
    return dict(tmp=tmp, ckpt=str(tmp / "tiny.pt"),
                data=folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"]),
                one=folder_dataset(tmp / "one", ["cat"]),
                few=folder_dataset(tmp / "few", ["cat", "dog", "fox"], per_class=3),
                long=folder_dataset(tmp / "long", ["cat", "dog", "fox", long_name]))


def args(world, out, *extra, data="data"):
    return ["--dataset", "folder", "--root", world[data], "--backbone", world["ckpt"],
            "--shots", "2", "--batch-size", "2", "--device", "cpu",
            "--out", str(world["tmp"] / out), *extra]


def refused(world, out, *extra, match, error=UsageError, data="data"):
    """train.main refuses with `error` matching `match`, before any training: no checkpoint."""
    with pytest.raises(error, match=match):
        train.main(args(world, out, *extra, data=data))
    assert not os.path.exists(world["tmp"] / out / "checkpoint.pt")


@pytest.mark.parametrize("extra, message", [
    (["--shots", "0"], "--shots: a positive number of images per class, or -1"),
    (["--shots", "-5"], "--shots: a positive number of images per class, or -1"),
    (["--n-ctx", "0", "--ctx-init", ""], "--n-ctx: must be greater than 0, got 0"),
    (["--epochs", "0"], "--epochs: must be greater than 0, got 0"),
    (["--batch-size", "0"], "--batch-size: must be greater than 0"),
    (["--lr", "0"], "--lr: must be greater than 0"),
    (["--lr", "-0.1"], "--lr: must be greater than 0"),
])
def test_values_outside_their_meaning_are_usage_errors(world, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        train.main(args(world, "values", *extra))
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(world["tmp"] / "values")


def test_context_rule_n_ctx_against_ctx_init(world):
    # CoOp under base2new starts from "a photo of a" (4 tokens): 8 context tokens cannot come
    # from it; the message says how to get what the user asked for
    for method in ("coop", "cocoop"):
        refused(world, f"nctx_{method}", "--method", method, "--n-ctx", "8",
                match=r"n_ctx=8 is more than the 4 tokens of ctx_init='a photo of a': pass "
                      r"n_ctx <= 4, or ctx_init='' for 8 random context vectors "
                      r"\(--n-ctx, --ctx-init\)")
    res = train.main(args(world, "nctx_ok", "--method", "coop", "--n-ctx", "8", "--ctx-init", "",
                          "--epochs", "1"))
    assert res["config"]["n_ctx"] == 8
    # fewer tokens than ctx_init: the first n_ctx are learned, "of a" stays fixed words
    res = train.main(args(world, "nctx_2", "--method", "coop", "--n-ctx", "2", "--epochs", "1"))
    learned = torch.load(world["tmp"] / "nctx_2" / "learned.pt", weights_only=True)["learned"]
    assert learned["prompt_learner.ctx"].shape[0] == 2


@pytest.mark.parametrize("data, message", [
    ("one", r"1 class\(es\) to train on; a classifier needs at least 2"),
    ("few", r"classes have no test images, e.g. 'cat'.*at least 4 per class"),
])
def test_datasets_too_small_are_refused_before_training(world, data, message):
    from data import DataError
    refused(world, f"small_{data}", "--method", "coop", "--protocol", "fewshot",
            match=message, error=DataError, data=data)


def test_too_long_class_name_in_the_new_half_is_refused_before_training(world):
    for method in ("coop", "cocoop", "zeroshot"):
        refused(world, f"long_{method}", "--method", method, data="long",
                match=r"class 'zebra 7777|class name 'zebra 7777|'[^']*zebra 7777.* too long")


def test_maple_depth_beyond_the_backbone_names_the_flag(world):
    refused(world, "depth", "--method", "maple",
            match=r"prompt_depth must be .* \(--prompt-depth\)")


def test_output_folder_that_cannot_be_written(world, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, message in ((a_file, "is a file"), (a_file / "below", "cannot write there"),
                         ("/proc/no_such_run", "cannot write there")):
        with pytest.raises(UsageError, match=message):
            train.main([*args(world, "x")[:-1], str(out)])


def test_unknown_device(world):
    with pytest.raises(UsageError, match="--device tpu: torch finds 0 GPU.* use cpu$"):
        train.main(args(world, "device", "--device", "tpu"))


def test_malformed_split_json_names_the_file(world, tmp_path):
    from data import DataError
    root = folder_dataset(tmp_path / "broken", ["cat", "dog"])
    (tmp_path / "broken" / "split_folder.json").write_text('{"train": [')
    with pytest.raises(DataError, match=r"split_folder.json is not valid JSON"):
        train.main([*args(world, "json")[:3], root, *args(world, "json")[4:]])


def test_text_file_as_backbone(world, tmp_path):
    import clip
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model")
    with pytest.raises(clip.CheckpointError, match="not a PyTorch checkpoint at all"):
        train.main([*args(world, "bb")[:5], str(text), *args(world, "bb")[6:]])


def test_same_command_twice_refuses_and_overwrite_replaces(world):
    common = ("--method", "coop", "--epochs", "1", "--protocol", "fewshot")
    first = train.main(args(world, "twice", *common))
    results = world["tmp"] / "twice" / "results.json"
    before = results.read_text()
    with pytest.raises(UsageError, match=r"holds a finished run: pass --overwrite to replace "
                                         "it, or another --out"):
        train.main(args(world, "twice", *common))
    assert results.read_text() == before  # untouched, log included
    assert "finished" not in (world["tmp"] / "twice" / "log.txt").read_text()
    again = train.main(args(world, "twice", *common, "--overwrite", "--seed", "2"))
    assert again["seed"] == 2 and json.loads(results.read_text())["seed"] == 2
    assert first["seed"] == 1


def test_resume_guards_its_run(world):
    settings = {"--method": "coop", "--epochs": "3", "--protocol": "fewshot", "--lr": "0.01",
                "--batch-size": "2", "--seed": "1"}

    def run(*extra, **changes):  # changes: {"--lr": "0.02"} as lr="0.02"
        flags = {**settings, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
        return train.main(args(world, "guarded", *[x for kv in flags.items() for x in kv], *extra))

    assert run("--stop-after-epoch", "1") is None
    ckpt = (world["tmp"] / "guarded" / "checkpoint.pt").read_bytes()
    for change, message in ((dict(lr="0.02"), "lr 0.01 there, 0.02 now"),
                            (dict(batch_size="4"), "batch_size 2 there, 4 now"),
                            (dict(seed="3"), "seed 1 there, 3 now"),
                            (dict(epochs="5"), "epochs 3 there, 5 now")):
        with pytest.raises(UsageError, match=rf"--resume: .* was written with other settings "
                                             rf"\(.*{message}.*\)"):
            run("--resume", **change)
    assert (world["tmp"] / "guarded" / "checkpoint.pt").read_bytes() == ckpt  # nothing lost
    with pytest.raises(UsageError, match=r"holds an interrupted run: pass --resume to continue"):
        run()  # a fresh start would discard epoch 1
    assert run("--resume")["accuracy"]
    with pytest.raises(UsageError, match="holds a finished run: nothing to resume"):
        run("--resume")


def test_ctrl_c_says_where_the_checkpoint_is(world, monkeypatch, capsys):
    get_lr = train.get_lr

    def interrupt_in_epoch_2(epoch, *a, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return get_lr(epoch, *a, **k)

    monkeypatch.setattr(train, "get_lr", interrupt_in_epoch_2)
    argv = args(world, "ctrl_c", "--method", "coop", "--epochs", "3", "--protocol", "fewshot")
    with pytest.raises(SystemExit) as info:
        runs.run_cli(lambda: train.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 130 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("interrupted. ") and err[-1].endswith(
        "checkpoint.pt holds epoch 1: run the same command with --resume to continue")


def test_command_line_errors_have_no_traceback(world):
    cmd = [sys.executable, "train.py", *args(world, "cli", "--shots", "-5")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--shots" in run.stderr.splitlines()[-1]
