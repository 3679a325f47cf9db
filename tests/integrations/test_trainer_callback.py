"""``NMTrainerCallback`` with the Hugging Face ``Trainer`` (tiny random-init Llama, offline, CPU,
``inductor: False``): a run resumed mid-interval (``mask_interval=3``) from a ``checkpoint-*``
folder ends with the uninterrupted run's weights, masks and stats, and without the saved mask
state it does not; the stats reach the logs; misuse is reported."""

from __future__ import annotations

import importlib.util
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

import nmcompile
from nmcompile import DenseFallbackWarning
from nmcompile.checkpoint_io import MASK_STATE_FILE

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
from nmcompile.integrations.transformers import (  # noqa: E402
    LOG_KEYS,
    NMTrainerCallback,
)

# a high learning rate on random weights, so that masks move between refreshes
pytestmark = pytest.mark.filterwarnings("ignore:nmcompile. the mask of:RuntimeWarning")
VOCAB, STEPS, SAVE_AT = 64, 8, 4  # masks refresh at calls 1, 4 and 7: step 4 is mid-interval


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _Recorder(transformers.TrainerCallback):
    """A callback after NMTrainerCallback, as a report_to integration passed after it."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _model(compile_nm: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    if compile_nm:
        model.compile(backend="nm", options={"inductor": False, "mask_interval": 3})
    return model


def _train(out, resume=None, callbacks=None, steps=STEPS, model=None):
    torch._dynamo.reset()
    model = model if model is not None else _model()
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
        save_steps=SAVE_AT, logging_steps=2, report_to="none", seed=0, use_cpu=True,
        learning_rate=1e-2, disable_tqdm=True)
    callbacks = [NMTrainerCallback()] if callbacks is None else callbacks
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer


def _same_run(a, b) -> tuple[bool, float]:
    masks_a, masks_b = nmcompile.masks(a), nmcompile.masks(b)
    same = sorted(masks_a) == sorted(masks_b) and all(
        torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return same, max(float((pa[k] - pb[k]).detach().abs().max()) for k in pa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recorder = _Recorder()
    model, trainer = _train(out, callbacks=[NMTrainerCallback(), recorder])
    return out, model, trainer, recorder


def test_resumed_mid_interval_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out, full, _, _ = uninterrupted
    checkpoint = tmp_path / f"checkpoint-{SAVE_AT}"
    shutil.copytree(out / f"checkpoint-{SAVE_AT}", checkpoint)
    saved = torch.load(checkpoint / MASK_STATE_FILE, weights_only=True)
    assert saved["global_step"] == SAVE_AT and len(saved["masks"]) == 7
    assert {e["steps"] for e in saved["masks"].values()} == {1}  # mid-interval: 1 of 3 steps
    resumed, _ = _train(tmp_path, resume=checkpoint)
    same_masks, diff = _same_run(full, resumed)
    assert same_masks and diff == 0.0
    assert nmcompile.stats(full) == nmcompile.stats(resumed)

    # negative control: the same resume without the saved mask state is warned about and
    # takes other steps (the masks restart from the step-4 weights)
    (checkpoint / MASK_STATE_FILE).unlink()
    with pytest.warns(RuntimeWarning, match=f"no {MASK_STATE_FILE} was found"):
        blind, _ = _train(tmp_path, resume=checkpoint)
    same_masks, diff = _same_run(full, blind)
    assert not same_masks and diff > 1e-4


def test_stats_are_added_to_the_logs(uninterrupted):
    _, model, trainer, recorder = uninterrupted
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in steps] == [2, 4, 6, 8]
    for entry in [*steps, *(r for r in recorder.logs if "loss" in r)]:
        found = {k for k in entry if k.startswith("nm/")}
        assert set(LOG_KEYS) - {"nm/flip_rate"} <= found <= set(LOG_KEYS)
        assert entry["nm/masked_weights"] == 7 and entry["nm/sparse_phase"] == 1.0
        assert 0.45 < entry["nm/density"] <= 0.5
    assert "nm/flip_rate" not in steps[0] and 0 <= steps[1]["nm/flip_rate"] <= 1
    assert [h["nm/refreshes"] for h in steps] == [1, 2, 2, 3]  # calls 1, 4, 7
    assert len(recorder.logs) == 5  # 4 logging steps and the summary, which gets no stats
    assert not any(k.startswith("nm/") for k in recorder.logs[-1])


@pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                    reason="compressed-tensors is not installed")
def test_export_reads_the_trainer_checkpoint_masks(uninterrupted, tmp_path):
    from nmcompile.cli import main

    out, *_ = uninterrupted
    checkpoint = out / f"checkpoint-{SAVE_AT}"
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "ct")]) == 0
    assert not (tmp_path / "ct" / "optimizer.pt").exists()
    masks = torch.load(checkpoint / MASK_STATE_FILE, weights_only=True)["masks"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct",
                                                               dtype=torch.float32)
    trained = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    params, dense = dict(loaded.named_parameters()), dict(trained.named_parameters())
    for name, entry in masks.items():
        assert torch.equal(params[name], torch.where(entry["forward"], dense[name], 0)), name


def test_a_dense_model_is_warned_about(tmp_path):
    with pytest.warns(DenseFallbackWarning, match="training is dense"):
        _train(tmp_path, steps=1, model=_model(compile_nm=False))


def _args(tmp_path, report_to=()):
    return SimpleNamespace(report_to=list(report_to), output_dir=str(tmp_path),
                           resume_from_checkpoint=None, should_save=True)


def test_misuse_is_reported(tmp_path):
    callback = NMTrainerCallback()
    fresh = SimpleNamespace(global_step=0)
    wrapped = torch.compile(torch.nn.Linear(4, 4), backend="nm")
    with pytest.raises(ValueError, match=r"model.compile\(backend='nm'"):
        callback.on_train_begin(_args(tmp_path), fresh, None, model=wrapped)
    with pytest.warns(UserWarning, match=r"report_to integrations \['tensorboard'\]"):
        callback.on_train_begin(_args(tmp_path, ["tensorboard"]), fresh, None,
                                model=torch.nn.Linear(4, 4))
    with warnings.catch_warnings():  # positive control: report_to="none" is not warned about
        warnings.simplefilter("error")
        callback.on_train_begin(_args(tmp_path), fresh, None, model=torch.nn.Linear(4, 4))

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    torch.save({"masks": {}, "global_step": 4}, folder / MASK_STATE_FILE)
    with pytest.raises(ValueError, match="saved at step 4, the Trainer resumes at step 3"):
        NMTrainerCallback(resume_from_checkpoint=str(folder)).on_train_begin(
            _args(tmp_path), SimpleNamespace(global_step=3), None, model=torch.nn.Linear(4, 4))
