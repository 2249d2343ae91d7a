"""What a run writes and reads back, by kind: output folders are the user's (only new, empty or
a run's own are written), a run is identified by its backbone and dataset, every file read back
fails as one error naming it, writes are atomic; clip's own refusals (tiny random CLIP, CPU)."""
import os
import subprocess
import sys

import pytest
import torch

import clip
import runs
import train
from conftest import folder_dataset, make_tiny_clip
from runs import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_folder")
    torch.save(make_tiny_clip().state_dict(), tmp / "tiny.pt")
    torch.save(make_tiny_clip(seed=1).state_dict(), tmp / "other.pt")  # same widths, other CLIP
    pets = folder_dataset(tmp / "pets", ["cat", "dog", "red fox", "sea_lion"])
    fruit = folder_dataset(tmp / "fruit", ["apple", "banana", "cherry"], seed=1)
    run = tmp / "run"
    train.main(args(tmp, pets, run, "--epochs", "1"))
    return dict(tmp=tmp, pets=pets, fruit=fruit, run=run)


def args(tmp, root, out, *extra):
    return ["--method", "coop", "--dataset", "folder", "--root", str(root), "--backbone",
            str(tmp / "tiny.pt"), "--shots", "2", "--batch-size", "2", "--device", "cpu",
            "--protocol", "fewshot", "--out", str(out), *extra]


def test_a_folder_with_the_users_files_is_refused_and_left_alone(world, tmp_path):
    (tmp_path / "log.txt").write_text("my own notes")
    with pytest.raises(UsageError, match="holds files that train.py did not write"):
        train.main(args(world["tmp"], world["pets"], tmp_path, "--overwrite"))
    assert (tmp_path / "log.txt").read_text() == "my own notes"
    (tmp_path / "log.txt").unlink()
    (tmp_path / "photo.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match="holds files that train.py did not write"):
        train.main(args(world["tmp"], world["pets"], tmp_path))
    assert os.listdir(tmp_path) == ["photo.jpg"]
    (tmp_path / "photo.jpg").unlink()
    (tmp_path / "holiday").mkdir()  # a folder of the user's, not an eval_* run
    with pytest.raises(UsageError, match="holds files that train.py did not write"):
        train.main(args(world["tmp"], world["pets"], tmp_path, "--overwrite"))
    assert os.listdir(tmp_path) == ["holiday"]


def test_overwrite_replaces_the_whole_run_eval_folders_included(world, tmp_path):
    out = tmp_path / "run"
    train.main(args(world["tmp"], world["pets"], out, "--epochs", "1"))
    train.main(["--eval-only", "--load", str(out), "--dataset", "folder", "--root",
                world["fruit"], "--device", "cpu"])
    assert os.path.isfile(out / "eval_folder_fewshot" / "results.json")
    train.main(args(world["tmp"], world["pets"], out, "--epochs", "1", "--overwrite"))
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "learned.pt", "log.txt", "results.json"]


def test_resume_of_a_folder_without_a_run_is_refused(world, tmp_path):
    with pytest.raises(UsageError, match=r"--resume: .*new holds no interrupted run \(no "
                                         r"checkpoint.pt\): nothing to resume. Check --out"):
        train.main(args(world["tmp"], world["pets"], tmp_path / "new", "--resume"))
    assert not os.path.exists(tmp_path / "new")


def test_eval_only_checks_the_backbone_and_defaults_to_the_runs_dataset(world, tmp_path, capsys):
    load = ["--eval-only", "--load", str(world["run"]), "--device", "cpu"]
    with pytest.raises(UsageError, match=r"--backbone .*other.pt is not the backbone .* was "
                                         r"trained with"):
        train.main([*load, "--backbone", str(world["tmp"] / "other.pt")])
    moved = tmp_path / "moved.pt"  # the same checkpoint elsewhere is the same backbone
    moved.write_bytes((world["tmp"] / "tiny.pt").read_bytes())
    res = train.main([*load, "--backbone", str(moved), "--out", str(tmp_path / "e1")])
    assert res["dataset"] == "folder" and res["config"]["root"] == world["pets"]
    assert "the dataset of --load" in capsys.readouterr().out
    trained = train.main([*load, "--out", str(tmp_path / "e2")])
    assert trained["accuracy"] == res["accuracy"]


def test_another_method_than_the_loaded_run_is_named(world):
    with pytest.raises(UsageError, match=r"--method cocoop, but --load .* holds a coop run"):
        train.main(["--method", "cocoop", "--eval-only", "--load", str(world["run"]),
                    "--device", "cpu"])


@pytest.mark.parametrize("name", ["learned.pt", "checkpoint.pt"])
def test_a_damaged_run_file_is_one_error_naming_it(world, tmp_path, name):
    """Truncated at any of a sweep of bytes, emptied, replaced by text or other tensors, with a
    non-finite value: UsageError naming the file (never torch's own message)."""
    data = (world["run"] / name).read_bytes()
    path = tmp_path / name
    cases = [data[:n] for n in range(0, len(data), max(1, len(data) // 40))]
    cases += [b"", b"hello", b"PK\x03\x04" + b"\0" * 30]
    for content in cases:
        path.write_bytes(content)
        with pytest.raises(UsageError, match=rf"{name}"):
            runs.read(str(path))
    torch.save({"learned": {"prompt_learner.ctx": torch.zeros(4, 64)}}, path)  # no config
    with pytest.raises(UsageError, match="is not a file written by train.py"):
        runs.read(str(path))
    saved = torch.load(world["run"] / name, weights_only=True)
    saved["learned"]["prompt_learner.ctx"][0, 0] = float("nan")
    torch.save(saved, path)
    with pytest.raises(UsageError, match="holds non-finite values"):
        runs.read(str(path))
    saved["learned"]["prompt_learner.ctx"] = torch.zeros(3, 64)  # another shape
    torch.save(saved, path)
    model = train.build_model(dict(saved["config"], device="cpu"),
                              clip.load(str(world["tmp"] / "tiny.pt"), "cpu")[0],
                              train.data.load("folder", world["pets"]))
    with pytest.raises(UsageError, match=rf"{name} does not fit this CoOp: .*other shapes"):
        runs.load_learned(model, runs.read(str(path))["learned"], str(path))


def test_a_full_disk_while_saving_is_one_error_and_leaves_no_temporary_file(tmp_path,
                                                                            monkeypatch):
    class FullDisk:
        def __init__(self, *a):
            self.f = open(*a)

        def write(self, payload):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(runs, "open", FullDisk, raising=False)
    with pytest.raises(UsageError, match=r"cannot write .*learned.pt \(No space left on device\)"):
        runs.save(str(tmp_path / "learned.pt"), learned={})
    assert os.listdir(tmp_path) == []


def test_clip_refusals_are_checkpoint_and_download_errors(tmp_path, monkeypatch):
    narrow = make_tiny_clip(transformer_width=32, transformer_heads=1).state_dict()
    with pytest.raises(clip.CheckpointError, match=r"width of 32 does not split into 0 attention "
                                                   r"heads .*transformer_heads=N"):
        clip.build_model(narrow)
    assert clip.build_model(narrow, transformer_heads=1).transformer.width == 32
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(clip.DownloadError, match="cannot create the download folder"):
        clip.load("ViT-B/32", download_root=str(blocked / "cache"))


def test_seed_beyond_its_range_is_a_usage_error(world, capsys):
    for seed in ("20000000000000000", "-1", "1.5"):
        with pytest.raises(SystemExit) as info:
            train.main(args(world["tmp"], world["pets"], world["tmp"] / "seed", "--seed", seed))
        assert info.value.code == 2 and "--seed" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(world):
    """tools/reproduce.py --dry-run | head: no BrokenPipeError traceback."""
    seeds = " ".join(map(str, range(1, 40)))  # > 64 KiB of commands: more than a pipe holds
    cmd = f"{sys.executable} tools/reproduce.py --protocol fewshot --seeds {seeds} --dry-run " \
        "| head -1"
    run = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr


class Arbitrary:
    """An object a pickle may hold and weights_only loading refuses to build."""


def test_a_pickle_that_is_not_a_run_file_is_one_error(tmp_path):
    """torch.load(weights_only=True) refuses arbitrary pickles with its own exception type."""
    path = tmp_path / "learned.pt"
    torch.save({"learned": {}, "config": {}, "object": Arbitrary()}, path)
    with pytest.raises(UsageError, match="cannot read .*learned.pt \\(UnpicklingError\\)"):
        runs.read(str(path))


def test_a_bug_keeps_its_traceback(capsys):
    """Only the project's bad-input errors become "error: ..."; a ValueError from a bug (a shape
    mismatch inside torch, say) propagates with its traceback."""
    def bug():
        raise ValueError("a bug, not bad input")
    with pytest.raises(ValueError, match="a bug, not bad input"):
        runs.run_cli(bug)
    with pytest.raises(SystemExit) as info:
        runs.run_cli(lambda: (_ for _ in ()).throw(UsageError("bad input")))
    assert info.value.code == 2 and capsys.readouterr().err == "error: bad input\n"


def test_a_refused_overwrite_keeps_the_finished_run(world, tmp_path):
    """--overwrite replaces a run only once the new command has passed its checks."""
    out = tmp_path / "kept"
    first = train.main(args(world["tmp"], world["pets"], out, "--epochs", "1"))
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    with pytest.raises(UsageError, match="n_ctx=8 is more than the 4 tokens"):
        train.main(args(world["tmp"], world["pets"], out, "--overwrite", "--n-ctx", "8",
                        "--ctx-init", "a photo of a"))
    assert all((out / p).read_bytes() == data for p, data in before.items())
    again = train.main(args(world["tmp"], world["pets"], out, "--overwrite", "--epochs", "1",
                            "--seed", "2"))
    assert again["seed"] == 2 and first["seed"] == 1
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "learned.pt", "log.txt", "results.json"]
    assert (out / "log.txt").read_text().startswith("python train.py")
