"""stepnet.stiffness_score: the features, the calibration's threshold rate on unseen inputs and
the metadata that stores it."""

import json

import numpy as np
import pytest

from stepnet import stiffness_score
from stepnet.repository.metadata import ScoreProfile, parse
from tests.service.conftest import DEFAULT_MODEL


def test_features_are_the_step_sizes_then_log_nsi_where_defined():
    step = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) / 100
    nsi = np.array([[np.nan, 2.0, 4.0], [np.nan, 1.0, np.e]])
    x = stiffness_score.features(step, nsi, [False, True, True])
    assert x.shape == (2, 3 * 3 + 2)
    np.testing.assert_allclose(x[:, :9], step.reshape(2, 9), rtol=1e-6)
    np.testing.assert_allclose(x[:, 9:], np.log([[2.0, 4.0], [1.0, np.e]]))
    names = stiffness_score.feature_names(["a", "b", "c"], [False, True, True])
    assert len(names) == x.shape[1] and names[:3] == ["a.step_size_mean", "a.step_size_min", "a.step_size_max"]
    assert names[9:] == ["b.log_nsi", "c.log_nsi"]


def test_the_threshold_holds_its_rate_on_unseen_inputs_and_far_inputs_score_high():
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.01, 4, 12)) + 0.3
    fit = rng.multivariate_normal(np.zeros(12), cov, 400)
    stored = stiffness_score.calibrate(fit)
    assert stored["samples"] == 400 and stored["quantile"] == 0.99 and 0 <= stored["shrinkage"] <= 1
    score = stiffness_score.Calibration.from_profile(ScoreProfile.model_validate(stored))
    unseen = score.score(rng.multivariate_normal(np.zeros(12), cov, 20_000))
    assert 0.7 < unseen.mean() < 1.5                         # about 1 per feature
    assert 0.003 <= (unseen > stored["threshold"]).mean() <= 0.03
    far = score.score(rng.multivariate_normal(np.linspace(-4, 4, 12), cov, 100))
    assert (far > stored["threshold"]).mean() > 0.95


def test_a_constant_feature_keeps_the_score_finite():
    """A plain network's step size is 1 on every input: scale floors at 1e-6, the score stays finite."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.ones((50, 3)), rng.normal(size=(50, 4))], axis=1)
    stored = stiffness_score.calibrate(x)
    score = stiffness_score.Calibration.from_profile(ScoreProfile.model_validate(stored))
    assert np.isfinite(score.score(x)).all() and np.isfinite(stored["threshold"])


@pytest.mark.parametrize("x", [np.zeros((5, 3)), np.full((20, 3), np.nan)])
def test_too_few_or_undefined_calibration_inputs_are_refused(x):
    with pytest.raises(ValueError, match="at least 8 calibration images"):
        stiffness_score.calibrate(x)


def test_model_json_refuses_a_score_of_the_wrong_size():
    meta = json.loads((DEFAULT_MODEL / "model.json").read_text())
    assert parse(json.dumps(meta)).profile.score is not None
    score = meta["profile"]["score"]
    score["mean"], score["scale"] = score["mean"][:-1], score["scale"][:-1]
    score["precision"] = [row[:-1] for row in score["precision"][:-1]]
    with pytest.raises(ValueError, match="features"):
        parse(json.dumps(meta))
