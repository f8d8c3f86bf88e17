"""A checkpoint written before the issue 16 redesign (saescope at commit b60c23a, tests/data/checkpoint_b60c23a)
still resumes, and today's code trains those steps to the same weights (within float32 rounding: the fixture was
written on another CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saescope.train import TrainConfig, Trainer
from saescope.train.checkpoint import CheckpointError, load_checkpoint
from saescope.train.compat import (
    NEW_CONFIG_DEFAULTS,
    NEW_SPEC_DEFAULTS,
    RESUMABLE_CHANGES,
    config_differences,
    fingerprint_payload,
    without_new_defaults,
)
from saescope.train.sources import TensorBatchSource

FIXTURE = Path(__file__).parent / "data" / "checkpoint_b60c23a"


def _setup(tmp_path: Path, name: str) -> tuple[TrainConfig, dict[str, torch.Tensor], dict[str, float]]:
    acts = load_file(str(FIXTURE / "activations.safetensors"))
    out = tmp_path / name
    cfg = TrainConfig.from_file(FIXTURE / "run" / "config.toml", out_dir=str(out))
    scales = {k: TensorBatchSource(acts, cfg.batch_size).norm_scale(k) for k in acts}
    return cfg, acts, scales


def _trainer(cfg, acts, scales) -> Trainer:
    return Trainer(cfg, TensorBatchSource(acts, cfg.batch_size, seed=3), scales, progress=False)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{u.spec.name}/{k}": v.clone() for u in trainer.units for k, v in u.module.state_tensors().items()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_old_checkpoint_resumes_and_matches_todays_training(tmp_path):
    cfg, acts, scales = _setup(tmp_path, "resumed")
    shutil.copytree(FIXTURE / "run" / "checkpoints", Path(cfg.out_dir) / "checkpoints")
    old_tensors, old_meta = load_checkpoint(Path(cfg.out_dir) / "checkpoints" / "step_00000005")
    probe = _trainer(cfg, acts, scales)
    probe._build()
    assert probe.resume() and probe.step == old_meta["step"] == 5       # it resumed, not restarted

    # today's code, from scratch to step 5: the same weights as the old code's checkpoint
    cfg_new, _, _ = _setup(tmp_path, "fresh")
    fresh = _trainer(cfg_new, acts, scales)
    fresh.run(max_steps=5)
    _assert_close(_weights(probe), _weights(fresh))
    prefix_names = {f"sae{i}/param/": u.spec.name for i, u in enumerate(probe.units)}
    for key, value in old_tensors.items():
        for prefix, name in prefix_names.items():
            if key.startswith(prefix):
                torch.testing.assert_close(_weights(probe)[f"{name}/{key[len(prefix):]}"], value, rtol=0, atol=0)

    # the resumed run finishes like an uninterrupted run of today's code
    resumed = _trainer(cfg, acts, scales)
    folders = resumed.run()
    assert resumed.step == cfg.total_steps and len(folders) == 2
    straight = _trainer(*_setup(tmp_path, "straight"))
    straight.run()
    _assert_close(_weights(resumed), _weights(straight))
    # and training moved the weights after the checkpoint (the comparison is not vacuous)
    assert any(not torch.allclose(_weights(resumed)[k], _weights(probe)[k]) for k in _weights(probe))


def test_old_checkpoint_refuses_a_changed_setting(tmp_path):
    cfg, acts, scales = _setup(tmp_path, "changed")
    shutil.copytree(FIXTURE / "run" / "checkpoints", Path(cfg.out_dir) / "checkpoints")
    data = cfg.model_dump()
    data["saes"][0]["frequency_penalty"] = 1.0
    changed = TrainConfig(**data)
    trainer = _trainer(changed, acts, scales)
    trainer._build()
    with pytest.raises(CheckpointError, match=r"saes\[0\]\.frequency_penalty: 0\.0 → 1\.0"):
        trainer.resume()


def _old_meta() -> dict:
    return json.loads((FIXTURE / "run" / "checkpoints" / "step_00000005" / "meta.json").read_text())


def test_every_field_added_since_the_old_checkpoint_keeps_its_fingerprint():
    """The one back-compat rule (saescope.train.compat): a field that did not exist when the fixture was written is
    either resumable or listed with the default that leaves old fingerprints unchanged — and that default is
    what today's config resolves the field to when it is not set."""
    meta = _old_meta()
    old_run, old_spec = set(meta["config"]), set(meta["config"]["saes"][0])
    cfg = TrainConfig.from_file(FIXTURE / "run" / "config.toml")
    assert cfg.fingerprint() == meta["fingerprint"]
    today = cfg.model_dump(mode="json")
    new_run = set(today) - old_run
    new_spec = set(today["saes"][0]) - old_spec
    assert new_spec, "the fixture predates the frequency penalty and the baselines: some spec fields are new"
    for name in sorted(new_run):
        assert name in NEW_CONFIG_DEFAULTS or name in RESUMABLE_CHANGES, (
            f"TrainConfig.{name} is new since the fixture: list it in saescope.train.compat")
        if name in NEW_CONFIG_DEFAULTS:
            assert today[name] == NEW_CONFIG_DEFAULTS[name], name
    for name in sorted(new_spec):
        assert name in NEW_SPEC_DEFAULTS, f"SAESpec.{name} is new since the fixture: list it in saescope.train.compat"
        for spec in today["saes"]:             # a λ spec left alone resolves the new field to the listed default
            assert spec[name] == NEW_SPEC_DEFAULTS[name], (name, spec[name])


def test_the_rule_drops_only_listed_defaults():
    assert without_new_defaults({"skip": False, "width": 8, "k": 3}, NEW_SPEC_DEFAULTS) == {"width": 8, "k": 3}
    cfg = TrainConfig.from_file(FIXTURE / "run" / "config.toml")
    data = cfg.model_dump(mode="json")
    payload = fingerprint_payload(data)
    assert "frequency_penalty" not in payload["saes"][0] and "total_tokens" not in payload
    data["saes"][0]["frequency_penalty"] = 1.0
    assert fingerprint_payload(data)["saes"][0]["frequency_penalty"] == 1.0
    assert config_differences(cfg.model_dump(mode="json"), data) == ["saes[0].frequency_penalty: 0.0 → 1.0"]
