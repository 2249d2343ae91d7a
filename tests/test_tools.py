"""tools/: predict, interpret, summarise, reproduce, on a tiny random CLIP and a folder dataset."""
import csv
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import runs
import train
from tools import interpret, predict, reproduce, summarise
from conftest import make_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["cat", "dog", "red fox", "sea_lion"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny CLIP checkpoint, 4 classes x 6 images (test split: 2 per class), and two CoOp runs:
    few-shot (all classes, 2 epochs: the context moves) and base-to-new (1 warm-up epoch)."""
    tmp = tmp_path_factory.mktemp("tools")
    tiny = make_tiny_clip()
    torch.save(tiny.state_dict(), tmp / "tiny.pt")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        os.makedirs(tmp / "pets" / c)
        for i in range(6):  # noisy images of a per-class colour, so classes differ a little
            pixels = rng.integers(0, 60, (32, 32, 3)) + rng.integers(0, 190, 3)
            Image.fromarray(pixels.astype(np.uint8)).save(tmp / "pets" / c / f"{i}.png")
    common = ["--dataset", "folder", "--root", str(tmp / "pets"), "--backbone",
              str(tmp / "tiny.pt"), "--shots", "2", "--batch-size", "2", "--device", "cpu",
              "--method", "coop"]
    fewshot = train.main([*common, "--protocol", "fewshot", "--epochs", "2",
                          "--out", str(tmp / "fewshot")])
    train.main([*common, "--epochs", "1", "--out", str(tmp / "b2n")])
    return dict(tmp=tmp, fewshot=fewshot, ckpt=str(tmp / "tiny.pt"), root=str(tmp / "pets"))


def test_predict_gives_the_evaluation_predictions(world, capsys):
    tmp, run = world["tmp"], str(world["tmp"] / "fewshot")
    ds = data.load("folder", world["root"], 2, 1)
    paths, labels = zip(*ds.test)
    rows = predict.main(["--load", run, *paths, "--topk", "2", "--device", "cpu",
                         "--out", str(tmp / "preds.csv")])
    # a direct forward of the model evaluation builds, over the same images
    saved = torch.load(tmp / "fewshot" / "learned.pt", weights_only=True)
    cfg = saved["config"]
    model = train.build_model(cfg, clip.load(world["ckpt"], "cpu")[0], ds)
    runs.load_learned(model, saved["learned"], "learned.pt")
    images = torch.stack([data.test_transform(32)(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        want = model.eval()(images).argmax(dim=-1).tolist()  # (N,)
    assert [p for p, _ in rows] == list(paths)  # the run's class names, by default
    assert [top[0][0] for _, top in rows] == [ds.classnames[i] for i in want]
    assert len(set(want)) > 1  # not one class for everything: the comparison means something
    accuracy = 100.0 * np.mean([top[0][0] == ds.classnames[y] for (_, top), y in zip(rows, labels)])
    assert accuracy == world["fewshot"]["accuracy"]["all"]  # the same as train.py's evaluation
    probs = [[q for _, q in top] for _, top in rows]
    assert all(1 >= p[0] >= p[1] > 0 for p in probs)
    with open(tmp / "preds.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 2 * len(paths) and lines[0]["class"] == rows[0][1][0][0]
    assert f"{len(ds.classnames)} classes, {len(paths)} images" in capsys.readouterr().out


def test_predict_folder_glob_own_classes_json(world):
    tmp = world["tmp"]
    out = str(tmp / "preds.json")
    rows = predict.main(["--load", str(tmp / "b2n"), os.path.join(world["root"], "cat"),
                         os.path.join(world["root"], "d*", "1.png"), "--device", "cpu",
                         "--out", out])
    assert len(rows) == 6 + 1 and all(len(top) == 2 for _, top in rows)  # base classes only
    assert {c for _, top in rows for c, _ in top} == {"cat", "dog"}
    rows = predict.main(["--load", str(tmp / "b2n"), os.path.join(world["root"], "cat", "0.png"),
                         "--classes", "tiger, wolf,owl", "--topk", "9", "--device", "cpu",
                         "--out", out])
    saved = json.load(open(out))
    assert [p["class"] for p in saved[0]["predictions"]] == [c for c, _ in rows[0][1]]
    assert sorted(c for c, _ in rows[0][1]) == ["owl", "tiger", "wolf"]  # top 9 -> 3 classes
    assert sum(p["probability"] for p in saved[0]["predictions"]) == pytest.approx(1, abs=1e-4)
    new = predict.main(["--load", str(tmp / "b2n"), os.path.join(world["root"], "cat", "0.png"),
                        "--subset", "new", "--device", "cpu"])
    assert {c for c, _ in new[0][1]} == {"red fox", "sea lion"}
    zs = predict.main(["--method", "zeroshot", "--backbone", world["ckpt"], "--classes",
                       "cat,dog", os.path.join(world["root"], "dog"), "--device", "cpu"])
    assert len(zs) == 6


def test_predict_bad_inputs_get_clear_errors(world, tmp_path):
    run, img = str(world["tmp"] / "fewshot"), os.path.join(world["root"], "cat", "0.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "random.pt")
    other = make_tiny_clip(transformer_width=128, transformer_heads=2)
    (tmp_path / "moved").mkdir()
    torch.save(other.state_dict(), tmp_path / "moved" / "tiny.pt")  # same name, other widths
    cases = [([str(tmp_path / "notes.txt")], "none of the 1 files is an image"),
             ([str(tmp_path / "empty")], "holds no images"),
             ([str(tmp_path / "*.jpg")], "no file matches"),
             ([img, "--method", "maple"], "holds coop prompts"),
             ([img, "--backbone", "ViT-B/16"], "trained with backbone"),
             ([img, "--backbone", str(tmp_path / "moved" / "tiny.pt")], "trained with backbone"),
             ([img, "--out", "preds.txt"], ".csv or .json")]
    for extra, message in cases:
        with pytest.raises(runs.USER_ERRORS, match=message):
            predict.main(["--load", run, "--device", "cpu", *extra])
    for load, message in ((tmp_path / "random.pt", "is not a file written by train.py"),
                          (tmp_path / "empty", "holds no learned.pt")):
        with pytest.raises(runs.UsageError, match=message):
            predict.main(["--load", str(load), img])
    saved = torch.load(os.path.join(run, "learned.pt"), weights_only=True)
    torch.save({"learned": {"prompt_learner.ctx": torch.zeros(3, 16, 64)},
                "config": dict(saved["config"], csc=True), "classnames": ["a", "b", "c"]},
               tmp_path / "csc.pt")
    with pytest.raises(runs.UsageError, match=r"--method coop --csc learns one tensor per "
                                              r"training class.*learned 3 classes \(a, b, c"):
        predict.main(["--load", str(tmp_path / "csc.pt"), img])  # the run's 4 classes
    cmd = [sys.executable, "tools/predict.py", "--load", run, str(tmp_path / "empty")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("holds no images (" + ", ".join(data.IMAGE_EXTS) + ")")


def test_interpret_reads_each_context_vector(world, tmp_path, capsys):
    # base2new CoOp starts from "a photo of a"; one warm-up epoch (lr 1e-5) barely moves it
    got = interpret.main([str(world["tmp"] / "b2n"), "--topk", "3"])
    assert list(got) == ["ctx"] and len(got["ctx"]) == 4  # n_ctx rows
    assert [words[0][0] for words in got["ctx"]] == ["a", "photo", "of", "a"]
    assert all(words[0][1] < 0.01 < words[1][1] for words in got["ctx"])
    interpret.main([str(world["tmp"] / "b2n"), "--show", "photo,outline"])
    out = capsys.readouterr().out
    assert "read as words: a photo of a" in out
    shown = next(line for line in out.splitlines() if "distance to 'photo'" in line).split()
    assert shown[-5] == "(#1)" and float(shown[-6]) < 0.01  # the 2nd vector is still "photo"
    moved = next(line for line in out.splitlines() if "moved from the init" in line).split()
    assert moved[-8::2] == ["a", "photo", "of", "a"] and max(map(float, moved[-7::2])) < 0.01
    few = interpret.main([str(world["tmp"] / "fewshot" / "learned.pt"), "--topk", "2"])
    assert len(few["ctx"]) == 16 and all(len(w) == 2 and w[0][1] <= w[1][1] for w in few["ctx"])
    (tmp_path / "words.txt").write_text("outline sketch\nphoto")
    only = interpret.main([str(world["tmp"] / "b2n"), "--words", str(tmp_path / "words.txt")])
    assert {w for words in only["ctx"] for w, _ in words} <= {"outline", "sketch", "photo"}
    # class-specific CoOp and MaPLe layouts, in hand-made prompt files of the run's config
    cfg = torch.load(world["tmp"] / "b2n" / "learned.pt", weights_only=True)["config"]
    files = {"csc": {"ctx": torch.randn(2, 3, 64) * 0.02},
             "maple": {"ctx": torch.randn(2, 64), "compound_prompts_text.0": torch.randn(2, 64),
                       "proj.weight": torch.randn(128, 64)}}
    for name, state in files.items():
        torch.save({"learned": {f"prompt_learner.{k}": v for k, v in state.items()},
                    "config": cfg}, tmp_path / f"{name}.pt")
    csc = interpret.main([str(tmp_path / "csc.pt"), "--max-classes", "1"])
    assert list(csc) == ["ctx, 'cat'"] and len(csc["ctx, 'cat'"]) == 3
    maple = interpret.main([str(tmp_path / "maple.pt")])
    assert list(maple) == ["ctx", "compound_prompts_text.0"]
    assert "skipped: proj.weight" in capsys.readouterr().out
    torch.save({"learned": {"prompt_learner.vision_ctx": torch.randn(8, 128)},
                "config": dict(cfg, method="vpt", model_options=[])}, tmp_path / "vpt.pt")
    with pytest.raises(runs.UsageError, match="this vpt run learned no text context"):
        interpret.main([str(tmp_path / "vpt.pt")])
    torch.save(torch.randn(4, 64), tmp_path / "random.pt")
    with pytest.raises(runs.UsageError, match="is not a file written by train.py"):
        interpret.main([str(tmp_path / "random.pt")])


def test_interpret_toy_vocabulary_names_the_toy_words():
    words = interpret.toy_words()
    assert {"outline", "sketch", "drawing", "striped", "star", "grass", "photo"} <= set(words)
    assert len(words) < 100  # a few dozen words, not the 49,408-token table


def write_results(folder, method, dataset, seed, accuracy, protocol="base2new", shots=16,
                  **config):
    os.makedirs(folder, exist_ok=True)
    r = dict(method=method, dataset=dataset, backbone="ViT-B/16", shots=shots, seed=seed,
             protocol=protocol, accuracy=accuracy, config=config)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(r, f)


def cells(text, first):
    """The cells of the Markdown row whose first cell is `first`."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {first} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_summarise_means_stds_and_h(tmp_path):
    acc = {"dtd": [(80.0, 50.0), (82.0, 56.0), (84.0, 59.0)], "eurosat": [(90.0, 60.0),
                                                                        (94.0, 70.0)]}
    for ds, seeds in acc.items():
        for seed, (b, n) in enumerate(seeds, 1):
            write_results(tmp_path / ds / f"seed{seed}", "cocoop", ds, seed,
                          dict(base=b, new=n, hm=2 * b * n / (b + n)))
    for shots, values in ((1, [50.0, 52.0, 57.0]), (16, [70.0, 71.0, 75.0])):
        for seed, a in enumerate(values, 1):
            write_results(tmp_path / "few" / f"{shots}_{seed}", "coop", "dtd", seed,
                          dict(all=a), protocol="fewshot", shots=shots)
            if shots == 16:  # cross-dataset: evaluated on eurosat with --eval-only --load
                write_results(tmp_path / "few" / f"{shots}_{seed}" / "eval_eurosat_fewshot",
                              "coop", "eurosat", seed, dict(all=a - 30), protocol="fewshot",
                              load="elsewhere", eval_only=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    text = summarise.main([str(tmp_path)])

    def ms(values):
        return f"{statistics.mean(values):.2f} ± {statistics.pstdev(values):.2f}"
    means = {}
    for ds, seeds in acc.items():
        b, n = zip(*seeds)
        h = 2 * statistics.mean(b) * statistics.mean(n) / (statistics.mean(b) + statistics.mean(n))
        assert cells(text, ds)[2:] == [ms(b), ms(n), f"{h:.2f}"]  # H of the seed means
        means[ds] = statistics.mean(b), statistics.mean(n)
    assert cells(text, "dtd")[1] == "1,2,3"
    b, n = np.mean(list(means.values()), axis=0)
    assert cells(text, "**Average (2 datasets)**")[2:] == [f"{b:.2f}", f"{n:.2f}",
                                                           f"{2 * b * n / (b + n):.2f}"]
    few = text[text.index("few-shot"):]
    assert cells(few, "dtd") == ["dtd", ms([50, 52, 57]), ms([70, 71, 75])]
    xfer = text[text.index("cross-dataset transfer"):]
    assert cells(xfer, "coop, ViT-B/16")[1:] == ["dtd, 16 shots", ms([70, 71, 75]),
                                                 ms([40, 41, 45]), "42.00"]
    assert "14 runs below" in text  # the broken file is skipped with a warning
    ci = summarise.summarise(str(tmp_path), ci95=True)
    b = [80.0, 82.0, 84.0]
    assert cells(ci, "dtd")[2] == f"82.00 ± {1.96 * statistics.pstdev(b) / 3 ** 0.5:.2f}"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(runs.UsageError, match="no usable results.json below"):
        summarise.main([str(tmp_path / "nothing")])


def test_reproduce_dry_run_lists_the_commands(tmp_path, capsys):
    out = str(tmp_path / "out")
    b2n = reproduce.main(["--protocol", "base2new", "--method", "cocoop", "--root", "/data",
                          "--out", out, "--dry-run"])
    assert len(b2n) == 11 * 3
    line = (f"python train.py --method cocoop --dataset dtd --root /data --protocol base2new "
            f"--shots 16 --seed 2 --backbone ViT-B/16 --out {out}/dtd/cocoop/"
            "ViT-B-16_16shots_base2new/seed2")  # a new run: no --resume (refused without a run)
    printed = capsys.readouterr().out.splitlines()
    assert line in printed and printed[0].startswith("base2new: 33 runs, 0 done")
    os.makedirs(f"{out}/dtd/cocoop/ViT-B-16_16shots_base2new/seed3")  # an interrupted run
    open(f"{out}/dtd/cocoop/ViT-B-16_16shots_base2new/seed3/checkpoint.pt", "w").close()
    cut = reproduce.main(["--protocol", "base2new", "--method", "cocoop", "--root", "/data",
                          "--out", out, "--dry-run", "--datasets", "dtd"])
    assert [c[-1] == "--resume" for c in cut] == [False, False, True]
    capsys.readouterr()
    write_results(f"{out}/dtd/cocoop/ViT-B-16_16shots_base2new/seed2", "cocoop", "dtd", 2,
                  dict(base=1.0, new=1.0, hm=1.0))
    again = reproduce.main(["--protocol", "base2new", "--method", "cocoop", "--root", "/data",
                            "--out", out, "--dry-run"])
    assert len(again) == 32 and line not in capsys.readouterr().out  # done: skipped
    few = reproduce.main(["--protocol", "fewshot", "--root", "/data", "--dry-run"])
    assert len(few) == 11 * 5 * 3 and all("--backbone RN50" in " ".join(c) for c in few)
    xd = reproduce.main(["--protocol", "crossdataset", "--method", "maple", "--root", "/data",
                         "--out", out, "--seeds", "1", "--dry-run", "--", "--workers", "8"])
    src = f"{out}/imagenet/maple/ViT-B-16_16shots_crossdataset/seed1"
    assert len(xd) == 1 + 10 and xd[0][-4:] == ["--out", src, "--workers", "8"]
    assert xd[0][xd[0].index("--protocol") + 1] == "crossdataset"  # train.py's recipe for it
    assert "imagenet" not in [c[5] for c in xd[1:]]
    assert xd[1] == ["python", "train.py", "--eval-only", "--load", src, "--dataset",
                     "caltech101", "--root", "/data", "--seed", "1", "--out",
                     f"{src}/eval_caltech101_crossdataset", "--workers", "8"]
    dg = reproduce.main(["--protocol", "domaingen", "--root", "/data", "--dry-run"])
    assert len(dg) == 3 * (1 + 4) and dg[1][6] == "imagenetv2"
    with pytest.raises(runs.UsageError, match="unknown datasets"):
        reproduce.main(["--protocol", "fewshot", "--datasets", "mnist", "--dry-run"])


def test_reproduce_runs_missing_jobs_and_skips_those_of_a_failed_training(tmp_path, monkeypatch,
                                                                         capsys):
    ran = []

    def fake_run(cmd):  # stands in for `python train.py ...`: writes what train.py would
        ran.append(cmd)
        arg = dict(zip(cmd[2::2], cmd[3::2])) if "--eval-only" not in cmd else \
            dict(zip(cmd[3::2], cmd[4::2]))
        if arg["--seed"] == "2" and "--eval-only" not in cmd:
            return subprocess.CompletedProcess(cmd, 1)  # seed 2's ImageNet training fails
        write_results(arg["--out"], "coop", arg["--dataset"], int(arg["--seed"]),
                      dict(all=50.0), protocol="fewshot",
                      **({"load": arg["--load"]} if "--load" in arg else {}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    argv = ["--protocol", "domaingen", "--method", "coop", "--root", "/data", "--out",
            str(tmp_path), "--seeds", "1", "2", "--datasets", "imagenet_a"]
    with pytest.raises(SystemExit) as info:
        reproduce.main(argv)
    assert info.value.code == 1 and len(ran) == 3  # 2 trainings, 1 evaluation
    assert ran[0][:2] == [sys.executable, reproduce.TRAIN]
    out = capsys.readouterr()
    assert "skipped (its training run" in out.out and "2 runs failed" in out.err
    assert "### domain generalisation" in out.out and "| coop, ViT-B/16 |" in out.out
    ran.clear()
    with pytest.raises(SystemExit):
        reproduce.main(argv)  # seed 1 is done; only seed 2 runs (and fails) again
    assert len(ran) == 1 and "--seed" in ran[0] and ran[0][ran[0].index("--seed") + 1] == "2"
