"""Learning curves (--eval-every) and the toy's story check (tools/toy_check.py) (tiny folder
dataset, tiny random CLIP, CPU)."""
import json
import os

import pytest
import torch

import train
from conftest import folder_dataset, make_tiny_clip
from tools import toy_check


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curves")
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    return dict(tmp=tmp, root=folder_dataset(tmp / "pets", ["cat", "dog", "fox", "owl"]))


def args(world, out, *extra):
    return ["--method", "coop", "--dataset", "folder", "--root", world["root"], "--backbone",
            str(world["tmp"] / "tiny.pt"), "--shots", "2", "--batch-size", "2", "--device",
            "cpu", "--epochs", "4", "--lr", "0.05", "--out", str(world["tmp"] / out), *extra]


def test_curve_points_are_evaluations_that_leave_training_alone(world):
    plain = train.main(args(world, "plain"))
    curved = train.main(args(world, "curved", "--eval-every", "3"))
    assert curved["accuracy"] == plain["accuracy"] and "curve" not in plain
    assert [p["epoch"] for p in curved["curve"]] == [3, 4]  # every 3 epochs, and the last
    last = curved["curve"][-1]
    assert {k: last[k] for k in ("base", "new", "hm")} == curved["accuracy"]
    assert all(p["seconds"] >= 0 for p in curved["curve"])
    a = torch.load(world["tmp"] / "plain" / "learned.pt", weights_only=True)["learned"]
    b = torch.load(world["tmp"] / "curved" / "learned.pt", weights_only=True)["learned"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((world["tmp"] / "curved" / "results.json").read_text())
    assert saved["curve"] == curved["curve"]


def test_a_resumed_run_keeps_its_curve(world):
    whole = train.main(args(world, "whole", "--eval-every", "1"))
    assert train.main(args(world, "cut", "--eval-every", "1", "--stop-after-epoch", "2")) is None
    resumed = train.main(args(world, "cut", "--eval-every", "1", "--resume"))
    strip = [{k: v for k, v in p.items() if k != "seconds"} for p in whole["curve"]]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in resumed["curve"]] == strip


def write_runs(out, table, drop):
    """results.json files for toy_check: table {method: (base, new)}, the same on seeds 1-2;
    CoOp's curve peaks at new + drop."""
    for seed in (1, 2):
        for method, (base, new) in table.items():
            folder = os.path.join(out, method, f"seed{seed}")
            os.makedirs(folder)
            curve = [dict(epoch=1, base=base, new=new + drop), dict(epoch=2, base=base, new=new)]
            with open(os.path.join(folder, "results.json"), "w") as f:
                json.dump(dict(accuracy=dict(base=base, new=new, hm=2 * base * new / (base + new)),
                               curve=curve if method == "coop" else [], train_seconds=1), f)


def test_toy_check_passes_the_story_and_names_each_failed_check(tmp_path, capsys):
    story = {"zeroshot": (77, 85), "coop": (99, 78), "cocoop": (95, 86), "maple": (97, 84),
             "finetune": (96, 80)}
    write_runs(tmp_path / "good", story, drop=6)
    assert toy_check.main(["--seeds", "1", "2", "--out", str(tmp_path / "good")]) == []
    bad = dict(story, coop=(99, 90), finetune=(96, 88))  # CoOp keeps the new classes
    write_runs(tmp_path / "bad", bad, drop=2)
    failed = toy_check.main(["--seeds", "1", "2", "--out", str(tmp_path / "bad")])
    assert failed == ["coop: new < zero-shot on seed 1", "coop: mean new <= zero-shot - 3",
                      "coop: mean curve: new ends >= 5 below its peak, base >= 95 at the end",
                      "cocoop: mean new >= CoOp's + 3", "cocoop: mean H > CoOp's",
                      "maple: mean H > CoOp's", "finetune: mean new < zero-shot"]
    assert "7 failed check(s) over seeds 1 2" in capsys.readouterr().out


def test_summarise_averages_curves_over_seeds(tmp_path):
    from tools import summarise
    for seed, news in ((1, (80, 70)), (2, (90, 74))):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        curve = [dict(epoch=e, base=99.0, new=n, hm=hm(99.0, n)) for e, n in zip((10, 20), news)]
        (folder / "results.json").write_text(json.dumps(dict(
            method="coop", dataset="toy", protocol="base2new", shots=16, seed=seed, backbone="toy",
            accuracy=curve[-1], curve=curve)))
    text = summarise.summarise(str(tmp_path))
    rows = text[text.index("### learning curve: coop, toy"):].splitlines()
    assert rows[4].startswith("| 10 | 2 | 99.00 ± 0.00 | 85.00 ± 5.00 |")
    assert rows[5].startswith("| 20 | 2 | 99.00 ± 0.00 | 72.00 ± 2.00 |")


def hm(b, n):
    return 2 * b * n / (b + n)
