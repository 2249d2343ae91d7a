"""Each method file + clip/ is a complete copy-paste unit: alone in an empty folder, its
`__main__` self-check runs on a tiny random CLIP (no weights, no data, no other project file)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# file -> trainable parameters its self-check reports on the tiny CLIP (text width 64,
# vision width 64, embed dim 32, 2 layers per tower).
EXPECTED = {
    "coop.py": 16 * 64,  # M = 16 random context vectors
    "cocoop.py": 4 * 64 + (32 * 2 + 2) + (2 * 64 + 64),  # ctx + meta-net 32 -> 2 -> 64
    "maple.py": 2 * (2 * 64 + 64 * 64 + 64),  # depth 2: P_0, F_0, P_1, F_1
    "ivlp.py": 2 * (2 * 64) + 2 * (2 * 64),  # depth 2: P_0, P_1 and P~_0, P~_1 (no F)
    "kgcoop.py": 4 * 64,  # CoOp's M = 4 context vectors from "a photo of a"
    "promptsrc.py": 2 * (4 * 64) + 2 * (4 * 64),  # depth 2: 4 + 4 tokens per layer, 2 towers
    "finetune.py": 3_384_896,  # the whole tiny CLIP but logit_scale
    "linearprobe.py": 0,  # the head is fitted by L-BFGS, not trained by SGD
    "zeroshot.py": 0,  # hand-written prompts: nothing is trained
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the self-checks at once (each pays for importing torch), then collect."""
    procs = {}
    for name in EXPECTED:
        folder = tmp_path_factory.mktemp(name.replace(".py", ""))
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), folder)
            shutil.copytree(os.path.join(ROOT, "clip"), folder / "clip",
                            ignore=shutil.ignore_patterns("__pycache__"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        # -s: no user site-packages; cwd and sys.path[0] are the temp folder, so only the
        # copied clip/ is importable (no project file can leak in).
        procs[name] = subprocess.Popen([sys.executable, "-s", name], cwd=folder, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    return {name: (p.communicate(timeout=300)[0], p.returncode) for name, p in procs.items()}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_method_file_runs_alone_with_clip(runs, name):
    assert os.path.exists(os.path.join(ROOT, name)), f"{name} is missing from the repository"
    out, rc = runs[name]
    assert rc == 0, f"{name} alone with clip/ failed:\n{out}"
    assert "logits (2, 5)" in out, out
    counts = re.findall(r"trainable parameters ([\d,]+)", out)
    assert counts and int(counts[0].replace(",", "")) == EXPECTED[name], out
