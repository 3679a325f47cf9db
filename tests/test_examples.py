"""The scripts in examples/ run with their defaults (as a user runs them) and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quickstart():
    out = _run("quickstart.py")
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert "9 weights trained 2:4 sparse" in out  # 2 blocks x (qkv, proj, fc, out) + head


@pytest.mark.slow
def test_hf_gpt2_trains_with_the_schedule_prunes_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = _run("hf_gpt2.py", "--out", str(tmp_path))
    assert "(sparse)" in out and "(dense (from sparse_stop=68))" in out
    masks = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert len(masks) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name  # saved pruned
