"""tools/distortion.py and tools/conditioning.py on real run folders: toy runs (the toy world and
its CLIP) and runs on a tiny OxfordPets in CoOp's split-JSON layout (a tiny random CLIP)."""
import contextlib
import io
import json
import os
import shutil
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coop
import data
import runs
import train
import zeroshot
from conftest import folder_dataset, make_tiny_clip
from tools import conditioning, distortion


def results(run):
    with open(os.path.join(run, "results.json")) as f:
        return json.load(f)["accuracy"]


def half_counts(run, root):
    """Test images per class of each half, counted from the dataset itself."""
    cfg = json.load(open(os.path.join(run, "results.json")))["config"]
    halves = data.halves(data.load(cfg["dataset"], root), cfg["protocol"])
    return {k: np.bincount([y for _, y in ds.test], minlength=len(ds.classnames)).tolist()
            for k, ds in halves.items()}


@pytest.fixture(scope="module")
def toy(toy_root, tmp_path_factory):
    """Toy runs (the toy world and its CLIP; every 8th test image, 10 per class, to keep the
    tests fast): zero-shot; CoOp ("a photo of a") after its warm-up epoch (lr 1e-5) and after 2
    epochs; CoCoOp after 2 epochs on 4 shots. Then distortion.py on the four (one call)."""
    tmp = tmp_path_factory.mktemp("analysis_toy")
    os.makedirs(tmp / "data" / "toy")
    for name in ("VERSION", "images"):  # the same rendering: ensure_dataset keeps it
        os.symlink(os.path.join(toy_root, "toy", name), tmp / "data" / "toy" / name)
    with open(os.path.join(toy_root, "toy", "split_zhou_Toy.json")) as f:
        split = json.load(f)
    split["test"] = split["test"][::8]
    (tmp / "data" / "toy" / "split_zhou_Toy.json").write_text(json.dumps(split))
    common = ["--root", str(tmp / "data"), "--device", "cpu"]
    train.main(["--method", "zeroshot", *common, "--out", str(tmp / "zs")])
    for name, epochs in (("coop1", "1"), ("coop2", "2")):
        train.main(["--method", "coop", "--epochs", epochs, *common, "--out", str(tmp / name)])
    train.main(["--method", "cocoop", "--epochs", "2", "--shots", "4", *common,
                "--out", str(tmp / "cocoop")])
    w = {k: str(tmp / k) for k in ("zs", "coop1", "coop2", "cocoop")} | {"root": str(tmp / "data")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), \
            mock.patch.dict(sys.modules, {"matplotlib": None}):  # import matplotlib fails
        w["report"] = distortion.main([w[k] for k in ("zs", "coop1", "coop2", "cocoop")] + [
            "--device", "cpu", "--json", str(tmp / "d.json"), "--plot", str(tmp / "d.png")])
    return w | {"printed": printed.getvalue(), "json": str(tmp / "d.json"),
                "png": str(tmp / "d.png")}


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """A tiny OxfordPets (split_zhou_OxfordPets.json, 4 classes x 4/1/3 images: base = the first
    two, new = the last two) and a tiny random CLIP; zero-shot, CoOp and CoCoOp runs."""
    tmp = tmp_path_factory.mktemp("analysis_pets")
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    d = tmp / "oxford_pets"
    classes = ["abyssinian", "pug", "sphynx", "beagle"]
    folder_dataset(d / "images", classes, per_class=8)
    split = {"train": [], "val": [], "test": []}
    for label, c in enumerate(classes):
        for i in range(8):
            key = "train" if i < 4 else "val" if i < 5 else "test"
            split[key].append([f"{c}/{i}.png", label, c])
    (d / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    common = ["--dataset", "oxford_pets", "--root", str(tmp), "--backbone", str(tmp / "tiny.pt"),
              "--device", "cpu", "--shots", "4"]
    train.main(["--method", "zeroshot", *common, "--out", str(tmp / "zs")])
    train.main(["--method", "coop", "--epochs", "2", "--batch-size", "4", *common,
                "--out", str(tmp / "coop")])
    train.main(["--method", "cocoop", "--epochs", "1", *common, "--out", str(tmp / "cocoop")])
    return {k: str(tmp / k) for k in ("zs", "coop", "cocoop")} | {"root": str(tmp)}


def report(world, request, keys):
    """distortion.py's results for the runs `keys` of the toy or the pets world: the toy's from
    its one call, the pets' from a call now."""
    w = request.getfixturevalue(world)
    if world == "toy":
        order = ["zs", "coop1", "coop2", "cocoop"]
        return w, [w["report"]["runs"][order.index(k)] for k in keys]
    return w, distortion.main([*(w[k] for k in keys), "--device", "cpu"])["runs"]


@pytest.mark.parametrize("world", ["toy", "pets"])
def test_zero_shot_run_is_at_distance_zero_from_the_template(world, request):
    w, (r,) = report(world, request, ["zs"])
    for h in r["halves"].values():
        assert max(abs(d) for d in h["distance"]) < 1e-6
        assert h["confusion"] == h["zeroshot_confusion"] and h["most_pulled"] == []
    assert r["halves"]["new"]["accuracy"] == results(w["zs"])["new"]


@pytest.mark.parametrize("world, keys", [("toy", ["coop2", "cocoop"]),
                                         ("pets", ["coop", "cocoop"])])
def test_confusion_rows_are_test_counts_and_diagonal_is_the_run_accuracy(world, keys, request):
    w, out = report(world, request, keys)
    zero_shot = results(w["zs"])
    for name, r in zip(keys, out):
        counts = half_counts(w[name], w["root"])
        assert set(r["halves"]) == {"base", "new"} == set(counts)
        for half, h in r["halves"].items():
            for key in ("confusion", "zeroshot_confusion"):
                assert [sum(row) for row in h[key]] == counts[half]
            diag = sum(h["confusion"][i][i] for i in range(len(counts[half])))
            assert 100.0 * diag / sum(counts[half]) == results(w[name])[half]
            assert h["zeroshot_accuracy"] == zero_shot[half]  # the zero-shot run's
            assert sorted(h["rank"]) == list(range(1, len(h["rank"]) + 1))
            by_rank = [h["distance"][h["rank"].index(k)] for k in range(1, len(h["rank"]) + 1)]
            assert by_rank == sorted(by_rank, reverse=True)


def test_warm_up_epoch_keeps_the_init_words_then_training_moves_them(request):
    _, (one, two) = report("toy", request, ["coop1", "coop2"])
    one, two = (r["halves"]["new"]["mean_distance"] for r in (one, two))
    # "a photo of a" after 3 steps at lr 1e-5: 1 - cos is 0 up to float32 rounding (~1e-7);
    # epoch 2 (lr 0.002) moves it well above that
    assert abs(one) < 1e-6 and two > 5e-6


def test_cocoop_class_features_are_the_ones_its_forward_scores(toy):
    cfg, state = distortion.open_run(toy["cocoop"])
    halves = distortion.read_halves(cfg)
    model = distortion.rebuild(cfg, state, halves, "cpu")[0]["new"].eval()
    items = halves["new"].test[::10]
    images = next(iter(data.make_loader(items, 32, len(items), False)))[0]
    with torch.no_grad():
        f = F.normalize(model.clip_model.encode_image(images), dim=-1)  # (B, E)
        g = distortion.cocoop_class_features(model, images)  # (B, n, E)
        logits = model.clip_model.logit_scale.exp() * torch.einsum("be,bne->bn", f, g)
        assert torch.allclose(logits, model(images), atol=1e-4)
    assert not torch.allclose(g[0], g[1])  # per image: the mean over images is not trivial
    # distortion.py's w_i for CoCoOp: the mean over all the half's test images, normalised,
    # in batches of 7 as in one batch
    images = next(iter(data.make_loader(halves["new"].test, 32, 1000, False)))[0]
    with torch.no_grad():
        w = F.normalize(distortion.cocoop_class_features(model, images).mean(0), dim=-1)
        w_clip = zeroshot.ZeroShot(model.clip_model, halves["new"].classnames,
                                   halves["new"].template).text_features()  # (n, E)
    assert torch.allclose(distortion.evaluate_half(model, halves["new"], 32, 7, "cpu")[1], w,
                          atol=1e-5)
    d = toy["report"]["runs"][3]["halves"]["new"]["distance"]
    assert torch.allclose(1 - (w * w_clip).sum(-1), torch.tensor(d), atol=1e-5)


def test_summary_correlation_json_and_plot_without_matplotlib(toy):
    new = [r["halves"]["new"] for r in toy["report"]["runs"]]
    x = np.array([h["mean_distance"] for h in new])
    y = np.array([h["accuracy"] - h["zeroshot_accuracy"] for h in new])
    xc, yc = x - x.mean(), y - y.mean()
    assert toy["report"]["correlation"]["new"] == pytest.approx(  # the end-to-end wiring
        (xc * yc).sum() / np.sqrt((xc ** 2).sum() * (yc ** 2).sum()))
    with open(toy["json"]) as f:
        assert json.load(f) == json.loads(json.dumps(toy["report"]))
    runs = tuple(toy[k] for k in ("zs", "coop1", "coop2", "cocoop"))
    lines = [line for line in toy["printed"].splitlines() if line.endswith(runs)]
    assert len(lines) == 4 + 4  # each run's heading and its summary line
    assert f"{x[2]:8.4f}" in lines[-2] and f"{y[2]:+7.2f}" in lines[-2]
    assert "Pearson correlation over 4 runs" in toy["printed"]
    assert "pip install matplotlib" in toy["printed"] and not os.path.exists(toy["png"])


def test_summary_pairs_each_half_distance_with_the_new_accuracy_change(capsys):
    def run(i, base, new, acc, fewshot=False):
        halves = {"all": dict(mean_distance=base)} if fewshot else {
            "base": dict(mean_distance=base),
            "new": dict(mean_distance=new, accuracy=acc, zeroshot_accuracy=50.0)}
        return dict(method="coop", seed=i, epochs=10, run=f"run{i}", halves=halves)
    base, new, change = [0.4, 0.1, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4], [-1.0, -2.0, -2.0, -5.0]
    runs = [run(i, b, n, 50.0 + c) for i, (b, n, c) in enumerate(zip(base, new, change))]
    corr = distortion.summarise(runs + [run(9, 0.5, None, None, fewshot=True)])
    for key, x in (("base", base), ("new", new)):  # Pearson's r by hand
        xc, yc = np.array(x) - np.mean(x), np.array(change) - np.mean(change)
        assert corr[key] == pytest.approx((xc * yc).sum() / np.sqrt((xc ** 2).sum() *
                                                                    (yc ** 2).sum()))
    assert corr["all"] is None  # no fewshot run has a new half to pair with
    printed = capsys.readouterr().out
    assert "   0.3000   0.3000        -    48.00     50.00   -2.00  run2" in printed
    assert "Pearson correlation over 4 runs" in printed
    assert distortion.summarise(runs[:2])["new"] is None
    assert "correlation: needs at least 3 runs" in capsys.readouterr().out


def test_most_pulled_and_abbreviations():
    zs = torch.tensor([[8, 2, 0], [0, 1, 9], [1, 0, 9]])
    run = torch.tensor([[2, 2, 6], [0, 7, 3], [5, 0, 5]])  # dog's diagonal grows most: ignored
    pulled = distortion.most_pulled(run, zs, ["fox", "dog", "cat"], 5)
    assert pulled == [("fox", "cat", 0, 6), ("cat", "fox", 1, 5)]  # increases only
    assert distortion.most_pulled(run, zs, ["fox", "dog", "cat"], 1) == [pulled[0]]
    assert distortion.abbreviate(["red fox", "red panda", "dog"]) == ["redf", "redp", "dog"]
    assert distortion.abbreviate(["a" * 9 + "x", "a" * 9 + "y"]) == ["c0", "c1"]


def test_bad_run_folders_get_clear_errors(toy, tmp_path):
    with pytest.raises(runs.UsageError, match="holds no learned.pt"):
        distortion.main([str(tmp_path), "--device", "cpu"])
    with pytest.raises(runs.UsageError, match="measures CoCoOp's meta-net"):
        conditioning.main([toy["coop1"], "--device", "cpu"])
    with pytest.raises(runs.UsageError, match="name a .json file"):
        distortion.main([toy["zs"], "--json", str(tmp_path / "x.txt")])


@pytest.mark.parametrize("world", ["toy", "pets"])
def test_conditioning_accuracy_as_trained_is_the_runs(world, request, tmp_path):
    w = request.getfixturevalue(world)
    out = conditioning.main([w["cocoop"], "--device", "cpu", "--json", str(tmp_path / "c.json")])
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(out))
    counts = half_counts(w["cocoop"], w["root"])
    for half, h in out[0]["halves"].items():
        assert h["accuracy"] == results(w["cocoop"])[half]
        assert h["images"] == sum(counts[half]) and len(h["constant_norm"]) == 4
        assert h["varying_mean"] > 0 and h["varying_max"] >= h["varying_mean"]
        for key in ("mean_pi", "zero_pi"):  # accuracy moves by at most the changed images
            moved = abs(h[f"accuracy_{key}"] - h["accuracy"]) * h["images"] / 100
            assert moved <= h[f"changed_{key}"] + 1e-9


def test_constant_meta_net_loses_nothing_to_its_mean(toy, tmp_path):
    """linear2.weight = 0: pi(x) = linear2.bias for every image, so replacing pi(x) by its mean
    changes nothing; with the bias 0 too, pi(x) = 0 is the model as trained."""
    shutil.copytree(toy["cocoop"], tmp_path / "run")
    path = tmp_path / "run" / "learned.pt"
    saved = torch.load(path, weights_only=True)
    saved["learned"]["prompt_learner.meta_net.linear2.weight"].zero_()
    torch.save(saved, path)
    h = conditioning.main([str(tmp_path / "run"), "--device", "cpu"])[0]["halves"]["new"]
    assert h["varying_mean"] < 1e-6 and h["changed_mean_pi"] == 0
    assert h["accuracy_mean_pi"] == h["accuracy"]
    assert h["pibar_norm"] == pytest.approx(
        saved["learned"]["prompt_learner.meta_net.linear2.bias"].norm().item(), rel=1e-5)
    saved["learned"]["prompt_learner.meta_net.linear2.bias"].zero_()
    torch.save(saved, path)
    h = conditioning.main([str(tmp_path / "run"), "--device", "cpu"])[0]["halves"]["new"]
    assert h["changed_zero_pi"] == 0 and h["accuracy_zero_pi"] == h["accuracy"]


def test_pi_replaced_by_its_mean_or_zero_is_coop_with_that_context(pets):
    """pi(x) -> pibar is a static prompt with context v + pibar, pi(x) -> 0 one with v: CoOp
    models with those contexts predict the same. pi(x) recomputed here from the meta-net."""
    cfg, state = distortion.open_run(pets["cocoop"])
    halves = distortion.read_halves(cfg)
    out = conditioning.main([pets["cocoop"], "--device", "cpu"])[0]["halves"]
    cocoop_models, _ = distortion.rebuild(cfg, state, halves, "cpu")
    for half, ds in halves.items():
        pl, h = cocoop_models[half].prompt_learner, out[half]
        images, labels = next(iter(data.make_loader(ds.test, 32, 100, False)))
        with torch.no_grad():
            f = F.normalize(cocoop_models[half].clip_model.encode_image(images), dim=-1)
            pis = pl.meta_net(f)  # (N, D)
        pibar = pis.mean(0)  # (D,)
        assert h["pibar_norm"] == pytest.approx(pibar.norm().item(), rel=1e-5)
        assert h["varying_mean"] == pytest.approx((pis - pibar).norm(dim=-1).mean().item(),
                                                  rel=1e-5)
        for key, ctx in (("mean_pi", pl.ctx + pibar), ("zero_pi", pl.ctx)):
            model = coop.CoOp(cocoop_models[half].clip_model, ds.classnames, n_ctx=4,
                              ctx_init="a photo of a").eval()
            model.prompt_learner.ctx.data.copy_(ctx)
            with torch.no_grad():
                acc = 100.0 * int((model(images).argmax(-1) == labels).sum()) / len(labels)
            assert acc == h[f"accuracy_{key}"], key
