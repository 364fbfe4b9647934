"""Named interventions: ``"vhr"`` / ``"var"`` / ``"zerotuning"`` resolve to the model's calibrated settings (else the
defaults), single settings can be replaced, and every entry point knows the same names."""

from __future__ import annotations

import pytest

from taskmllm.errors import CheckpointError, ConfigError
from taskmllm.model.interventions import VAR, VHR, ZeroTuning
from taskmllm.model.interventions.calibrated import FILENAME, NAMES, make_intervention

CALIBRATED = {"vhr": {"alpha": 1.25, "layers": [3], "remove_outliers": True},
              "zerotuning": {"gamma": 1.0, "heads": None, "gammas": [[0, 1, 2.0], [1, 0, 0.5]]}}


def test_names_are_one_list_everywhere():
    from taskmllm.cli import INTERVENTION_CHOICES
    from taskmllm.predict import INTERVENTIONS

    assert tuple(INTERVENTIONS) == NAMES == tuple(INTERVENTION_CHOICES) == ("none", "vhr", "var", "zerotuning")


def test_calibrated_settings_then_defaults_then_overrides():
    assert make_intervention(None) is None and make_intervention("none", CALIBRATED) is None
    vhr = make_intervention("VHR", CALIBRATED)
    assert isinstance(vhr, VHR) and vhr.settings() == CALIBRATED["vhr"]
    assert make_intervention("vhr", CALIBRATED, alpha=2.0, unused=None).settings() == {**CALIBRATED["vhr"], "alpha": 2.0}
    var = make_intervention("var", CALIBRATED)
    assert isinstance(var, VAR) and var.settings() == VAR().settings(), "not calibrated: the defaults"
    assert var.p == 0.4 and var.mode == "official"
    zt = make_intervention("zerotuning", CALIBRATED)
    assert isinstance(zt, ZeroTuning) and zt.gammas == {(0, 1): 2.0, (1, 0): 0.5}
    assert make_intervention("zerotuning", {}).settings() == ZeroTuning().settings(), "uncalibrated: the identity"


@pytest.mark.parametrize("name, overrides, match", [
    ("dola", {}, "unknown intervention 'dola'"),
    (3, {}, "must be a string"),
    ("vhr", {"p": 0.3}, "unknown VHR settings"),
    ("vhr", {"alpha": -1.0}, "VHR alpha"),
    ("zerotuning", {"gamma": 2.0}, "per-head gammas"),
])
def test_bad_names_and_settings_are_config_errors(name, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_intervention(name, CALIBRATED, **overrides)


def test_a_malformed_interventions_json_fails_before_the_weights_load(tmp_path):
    from taskmllm.router.pipeline import Pipeline

    (tmp_path / FILENAME).write_text('{"format": "taskmllm-interventions", "version": 1, "interventions": '
                                     '{"vhr": {"settings": {"alpha": "2"}}}}')
    with pytest.raises(CheckpointError, match="interventions.json.*alpha"):
        Pipeline.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def shipped_tiny():
    from taskmllm.router.pipeline import Pipeline

    return Pipeline.from_pretrained("tiny")


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_the_shipped_tiny_calibration_fits_its_weights(shipped_tiny, name, rgb_image):
    """Each intervention of the packaged tiny's ``interventions.json`` is read as calibrated and attaches to the
    packaged weights (an out-of-range layer or head is a ConfigError at attach); ``tests/smol`` checks smol's."""
    assert shipped_tiny.intervention_source(name) == "calibrated"
    assert shipped_tiny(rgb_image, "Is there a red circle?", max_new_tokens=6, intervention=name).text
