"""Every example command in README.md and tools/README.md names scripts, modules and toy files
that exist, and every flag it passes is one the script accepts."""
import glob
import os
import re
import shlex

import pytest

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", os.path.join("tools", "README.md")]


def commands(doc):
    """The shell commands of a Markdown file: its ```bash blocks, and the `$ ` lines of its
    example-output blocks (with their continuation lines)."""
    lines, fence = [], None  # fence: the open block's language, None outside blocks
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        for line in f.read().replace("\\\n", " ").splitlines():
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
            elif fence == "bash" or fence == "" and line.startswith("$ "):
                lines.append(line.removeprefix("$ "))
    parts = [p.split("#")[0].strip() for line in lines for p in re.split(r";|&&", line)]
    return [p for p in parts if p.startswith(("python", "torchrun"))]


@pytest.mark.parametrize("doc", DOCS)
def test_examples_name_files_that_exist(doc, toy_root):
    cmds = commands(doc)
    assert cmds, f"no example commands found in {doc}"
    for cmd in cmds:
        words = shlex.split(cmd)
        if "-m" in words:  # python -m toy.pretrain: a module of the repository
            module = words[words.index("-m") + 1].replace(".", os.sep) + ".py"
            assert os.path.isfile(os.path.join(ROOT, module)) or module.startswith("pytest"), cmd
        for w in words:
            if w.endswith(".py"):
                assert os.path.isfile(os.path.join(ROOT, w)), f"{doc}: {w} in `{cmd}`"
            if w.startswith("data/toy/"):  # the toy task as train.py renders it under ./data
                assert glob.glob(os.path.join(toy_root, w[len("data/"):])), f"{doc}: {w}"


def test_train_examples_use_flags_train_py_has():
    flags = {o for a in train.parser._actions for o in a.option_strings}
    for doc in DOCS:
        for cmd in commands(doc):
            words = shlex.split(cmd)
            if "train.py" not in words:
                continue
            for w in words[words.index("train.py") + 1:]:
                if w.startswith("--"):
                    assert w in flags, f"{doc}: {w} in `{cmd}`"
