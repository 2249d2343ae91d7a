"""train.py on a tiny folder dataset and a tiny random CLIP checkpoint (CPU, seconds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import clip
import runs
import train
import zeroshot
from conftest import folder_dataset, make_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    tiny = make_tiny_clip()
    ckpt = str(tmp / "tiny.pt")
    torch.save(tiny.state_dict(), ckpt)
    return dict(tmp=tmp, ckpt=ckpt,
                data=folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"]),
                other=folder_dataset(tmp / "fruit", ["apple", "banana", "cherry"], seed=1))


def args(world, out, *extra):
    return ["--dataset", "folder", "--root", world["data"], "--backbone", world["ckpt"],
            "--shots", "2", "--batch-size", "2", "--device", "cpu",
            "--out", str(world["tmp"] / out), *extra]


def test_get_lr_matches_the_official_schedule():
    got = [train.get_lr(e, 0.002, 10) for e in range(10)]
    want = [1e-5, 0.002, 0.001951, 0.001809, 0.001588, 0.001309]
    assert got[:6] == pytest.approx(want, abs=1e-6)
    assert got[-1] == pytest.approx(0.000191, abs=1e-6)
    got = [train.get_lr(e, 0.0035, 5) for e in range(5)]
    assert got == pytest.approx([1e-5, 0.0035, 0.003166, 0.002291, 0.001209], abs=1e-6)
    assert train.get_lr(199, 0.002, 200) == pytest.approx(4.9e-7, rel=0.01)


def test_end_to_end_run(world):
    out = world["tmp"] / "e2e"
    cmd = [sys.executable, "train.py", *args(world, "e2e", "--method", "coop", "--epochs", "2")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "dataset", "backbone", "shots", "seed", "protocol", "accuracy",
                "train_seconds", "skipped_images", "config"):
        assert key in results
    acc = results["accuracy"]
    assert set(acc) == {"base", "new", "hm"}
    assert all(isinstance(v, float) and 0 <= v <= 100 for v in acc.values())
    assert acc["hm"] == pytest.approx(2 * acc["base"] * acc["new"] / (acc["base"] + acc["new"]))
    assert results["config"]["n_ctx"] == 4 and results["config"]["ctx_init"] == "a photo of a"
    saved = torch.load(out / "learned.pt", weights_only=True)
    assert list(saved["learned"]) == ["prompt_learner.ctx"]
    assert saved["config"]["method"] == "coop"
    log = (out / "log.txt").read_text()
    assert "epoch [2/2] batch [2/2] loss" in log and "hm" in log.splitlines()[-1]


def learned(run_dir, name="learned.pt"):
    """The learned tensors a run saved (or its checkpoint's, name="checkpoint.pt")."""
    return torch.load(os.path.join(run_dir, name), weights_only=True)["learned"]


def count_steps(monkeypatch):
    steps = []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
    return steps


# maple: depth 2, the tiny CLIP's 2 layers; finetune: the image tower, to stay small
RESUMABLE = {"coop": [], "cocoop": ["--batch-size", "4"], "maple": ["--prompt-depth", "2"],
             "finetune": ["--finetune-part", "image"]}


@pytest.mark.parametrize("method", list(RESUMABLE))
def test_resume_continues_the_interrupted_run(world, method, monkeypatch):
    common = ("--method", method, "--epochs", "3", "--lr", "0.05", "--protocol", "fewshot",
              *RESUMABLE[method])
    whole = train.main(args(world, f"whole_{method}", *common))
    cut = world["tmp"] / f"cut_{method}"
    steps = count_steps(monkeypatch)
    assert train.main(args(world, cut.name, *common, "--stop-after-epoch", "2")) is None
    assert not (cut / "results.json").exists()
    at_2, two_epochs = learned(cut, "checkpoint.pt"), len(steps)
    resumed = train.main(args(world, cut.name, *common, "--resume"))
    # Only the third epoch ran (a fresh run would run all three), and from the saved optimiser
    # state (momentum): without it the result would not be bit-identical to the whole run.
    assert two_epochs > 0 and len(steps) - two_epochs == two_epochs // 2
    assert resumed["accuracy"] == whole["accuracy"]
    final, whole_final = learned(cut), learned(world["tmp"] / f"whole_{method}")
    assert final.keys() == whole_final.keys() == at_2.keys()
    for k in final:
        assert torch.equal(final[k], whole_final[k]), k  # bit for bit
    assert any(not torch.equal(final[k], at_2[k]) for k in final)  # epoch 3 did train
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_eval_only_uses_the_loaded_prompts(toy_root, tmp_path):
    """Toy world, shipped toy CLIP: a few CoOp epochs move the accuracy away from zero-shot;
    evaluating the saved prompts gives exactly the training run's accuracy."""
    common = ["--root", toy_root, "--device", "cpu"]
    trained = train.main(["--method", "coop", "--epochs", "5", *common,
                          "--out", str(tmp_path / "coop")])
    zero = train.main(["--method", "zeroshot", *common, "--out", str(tmp_path / "zs")])
    again = train.main(["--eval-only", "--load", str(tmp_path / "coop"), *common])
    assert again["accuracy"] == trained["accuracy"]
    assert again["accuracy"]["base"] != zero["accuracy"]["base"]
    assert again["config"]["method"] == "coop"


def test_eval_only_on_other_class_names(world):
    train.main(args(world, "src", "--method", "coop", "--epochs", "1", "--protocol", "fewshot"))
    src = str(world["tmp"] / "src")
    results = train.main(["--eval-only", "--load", src, "--dataset", "folder", "--root",
                          world["other"], "--device", "cpu"])
    assert results["protocol"] == "fewshot"  # taken from the saved run
    assert set(results["accuracy"]) == {"all"}
    assert results["config"]["backbone"] == world["ckpt"]
    assert os.path.isfile(os.path.join(src, "eval_folder_fewshot", "results.json"))


def test_zeroshot_with_own_template_and_ensemble(world):
    own = train.main(args(world, "zs", "--method", "zeroshot", "--template",
                          "a blurry photo of a {}."))
    assert set(own["accuracy"]) == {"base", "new", "hm"} and own["train_seconds"] < 1
    assert own["config"]["template"] == "a blurry photo of a {}."
    ens = train.main(args(world, "zs_ens", "--method", "zeroshot", "--ensemble",
                          "--protocol", "fewshot"))
    assert set(ens["accuracy"]) == {"all"}


def test_zeroshot_ensemble_averages_normalised_features(world):
    clip_model = clip.load(world["ckpt"], "cpu")[0]
    templates = zeroshot.ENSEMBLE_TEMPLATES + ["a blurry photo of a {}."]
    model = zeroshot.ZeroShot(clip_model, ["cat", "dog"], templates[-1], ensemble=True)
    only_seven = zeroshot.ZeroShot(clip_model, ["cat", "dog"], None, ensemble=True)
    with torch.no_grad():
        feats = torch.stack([torch.nn.functional.normalize(clip_model.encode_text(
            clip.tokenize([t.format(c) for c in ["cat", "dog"]])), dim=-1) for t in templates])
        for got, rows in ((model, feats), (only_seven, feats[:7])):
            want = torch.nn.functional.normalize(rows.sum(0), dim=-1)
            torch.testing.assert_close(got.text_features(), want)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(world):
    with pytest.raises(FloatingPointError, match=r"at epoch 2/2, batch \d/4.*lower --lr"):
        train.main(args(world, "nan", "--method", "coop", "--epochs", "2", "--lr", "1e30",
                        "--protocol", "fewshot"))
    ckpt = torch.load(world["tmp"] / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and torch.isfinite(ckpt["learned"]["prompt_learner.ctx"]).all()


@pytest.mark.parametrize("extra, error, message", [
    (["--root", "/no/such/folder"], "DataError", "/no/such/folder"),
    (["--backbone", "/no/such/model.pt"], "CheckpointError", "checkpoint file not found"),
    (["--method", "zeroshot", "--n-ctx", "4"], "UsageError", "--n-ctx is not an option"),
    (["--method", "cocoop", "--csc"], "UsageError", "--csc is not an option"),
    (["--eval-only"], "UsageError", "--load DIR"),
    (["--eval-only", "--load", "/no/such/run"], "UsageError", "holds no learned.pt"),
])
def test_bad_input_gives_a_clear_error(world, extra, error, message):
    out = f"bad_{'_'.join(extra).replace('/', '').replace('-', '')}"  # each case its own folder
    with pytest.raises(runs.USER_ERRORS) as info:
        train.main(args(world, out, *extra))
    assert type(info.value).__name__ == error and message in str(info.value)
    assert not (world["tmp"] / out / "checkpoint.pt").exists()


@pytest.mark.parametrize("template", ["a photo", "a {} in {place}.", "a {} and a {}.", "{}}"])
def test_templates_are_checked_where_they_are_parsed(world, template, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(args(world, "bad_template", "--method", "zeroshot", "--template", template))
    assert info.value.code == 2
    assert "must hold exactly one {}, where the class name goes" in capsys.readouterr().err


def test_unknown_method_is_a_usage_error(world, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(args(world, "bad", "--method", "prompt_magic"))
    assert info.value.code == 2 and "invalid choice: 'prompt_magic'" in capsys.readouterr().err


def test_command_line_error_exit_code_and_no_traceback(world):
    cmd = [sys.executable, "train.py", *args(world, "bad_cli", "--backbone", "/no/such.pt")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: checkpoint file not found")
    assert "Traceback" not in run.stderr


def test_help_lists_every_option():
    text = train.parser.format_help()
    for option in ("--method", "--dataset", "--root", "--backbone", "--shots", "--seed",
                   "--protocol", "--n-ctx", "--ctx-init", "--csc", "--class-token-position",
                   "--epochs", "--lr", "--batch-size", "--precision", "--eval-only", "--load",
                   "--resume", "--template", "--ensemble", "--out"):
        assert option in text
    assert "--stop-after-epoch" not in text  # a hidden option for the resume test


def test_finetune_and_linear_probe_run_end_to_end(world):
    res = train.main(args(world, "ft", "--method", "finetune", "--finetune-part", "image",
                          "--epochs", "1"))
    assert set(res["accuracy"]) == {"base", "new", "hm"}
    saved = learned(world["tmp"] / "ft")
    assert saved and all(k.startswith("trained_part.visual.") for k in saved)
    res = train.main(args(world, "lp", "--method", "linearprobe"))  # fewshot by default
    assert res["protocol"] == "fewshot" and set(res["accuracy"]) == {"all"}
    res = train.main(["--eval-only", "--load", str(world["tmp"] / "lp"), "--dataset", "folder",
                      "--root", world["data"], "--device", "cpu",
                      "--out", str(world["tmp"] / "lp_eval")])
    assert set(res["accuracy"]) == {"all"}
