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


@pytest.mark.slow
def test_hf_trainer_trains_with_the_callback_and_resumes(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    small = ["--batch-size", "2", "--seq-len", "32", "--save-steps", "3", "--out", str(tmp_path)]
    out = _run("hf_trainer.py", "--steps", "6", *small)
    assert "14 weights trained 2:4 sparse" in out  # 2 layers x 7 projections
    assert "'nm/density'" in out  # the Trainer's console log shows the stats
    rows = [line for line in out.splitlines() if line.startswith("| model.layers.")]
    assert len(rows) == 14 and all("| sparse" in row for row in rows)
    saved = torch.load(tmp_path / "checkpoint-6" / "nm_mask_state.pt", weights_only=True)
    assert saved["global_step"] == 6 and len(saved["masks"]) == 14
    out = _run("hf_trainer.py", "--steps", "9", "--resume", *small)
    assert "14 weights trained 2:4 sparse" in out
    assert torch.load(tmp_path / "checkpoint-9" / "nm_mask_state.pt",
                      weights_only=True)["global_step"] == 9


def _torchrun(script: str, *args: str, cwd: Path) -> str:
    """``torchrun --standalone --nproc_per_node=2 examples/SCRIPT ARGS`` (gloo on CPU)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(ROOT / "examples" / script), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


BLOCK_LAYERS = sorted(f"blocks.{b}.{layer}.weight" for b in (0, 1)
                      for layer in ("attn.qkv", "attn.proj", "fc", "out"))


def _table_params(out: str) -> set[str]:
    """The params of the sparse rows of the per-matmul table printed on rank 0."""
    rows = [line.split("|") for line in out.splitlines() if line.startswith("|")]
    return {row[4].strip() for row in rows[2:] if row[7].strip() == "yes"}


def test_ddp_example_trains_on_two_processes_and_saves_its_masks(tmp_path):
    out = _torchrun("ddp.py", "--steps", "4", "--out", "run", cwd=tmp_path)
    assert "9 weights trained 2:4 sparse" in out
    assert _table_params(out) == {*BLOCK_LAYERS, "head.weight"}
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt")
    assert sorted(ckpt["masks"]) == sorted([*BLOCK_LAYERS, "head.weight"])
    assert ckpt["step"] == 4 and set(ckpt["masks"]) <= set(ckpt["model"])


def test_fsdp2_example_trains_saves_and_resumes_on_two_processes(tmp_path):
    out = _torchrun("fsdp2.py", "--steps", "3", "--out", "run", cwd=tmp_path)
    assert "8 weights trained 2:4 sparse" in out  # the blocks; embeddings and head uncompiled
    # one graph (traced with block 0's weights, named as FSDP names them) serves both blocks
    assert _table_params(out) == {n for n in BLOCK_LAYERS if n.startswith("blocks.0.")}
    saved = torch.load(tmp_path / "run" / "step_3" / "masks.pt")
    assert saved["step"] == 3 and sorted(saved["masks"]) == BLOCK_LAYERS
    assert saved["masks"]["blocks.0.fc.weight"]["forward"].shape == (512, 128)  # full shape
    out = _torchrun("fsdp2.py", "--steps", "2", "--out", "run", "--resume", cwd=tmp_path)
    assert "resumed at step 3" in out and "step   4" in out
    assert torch.load(tmp_path / "run" / "step_5" / "masks.pt")["step"] == 5
