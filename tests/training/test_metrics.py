"""peft_tensor.training.metrics: MONAI's FutureWarning about ``always_return_as_numpy`` (its Hausdorff metric calls
``get_mask_edges`` with the deprecated argument itself) is silenced at that one call, and only that warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from peft_tensor.training.metrics import case_metrics

NUMPY_WARNING = "always_return_as_numpy"


def _masks():
    pred = np.zeros((8, 8, 8), bool)
    pred[2:5, 2:5, 2:5] = True
    truth = np.zeros((8, 8, 8), bool)
    truth[2:6, 2:5, 2:5] = True
    return pred, truth


def _future_numpy_warnings(records) -> list:
    return [w for w in records if issubclass(w.category, FutureWarning) and NUMPY_WARNING in str(w.message)]


def test_monai_hausdorff_warns_about_always_return_as_numpy():
    """The premise: MONAI's metric, called directly, emits the warning (if not, drop the filter in metrics.py)."""
    import torch
    from monai.metrics import HausdorffDistanceMetric

    pred, truth = (torch.stack([torch.as_tensor(~m), torch.as_tensor(m)]).float()[None] for m in _masks())
    with pytest.warns(FutureWarning, match=NUMPY_WARNING):
        HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pred, truth)


def test_case_metrics_emits_no_always_return_as_numpy_warning(recwarn):
    row = case_metrics(*_masks(), min_component_voxels=2)  # the HD95 twice: plain and after component removal
    assert row["hd95"] == 1.0 and row["hd95_cc"] == 1.0
    assert _future_numpy_warnings(recwarn.list) == []


def test_other_warnings_still_pass_through(monkeypatch, recwarn):
    import monai.metrics

    real = monai.metrics.HausdorffDistanceMetric

    class NoisyHausdorff(real):
        def __call__(self, *args, **kwargs):
            warnings.warn("another FutureWarning from the metric", FutureWarning)
            warnings.warn("a UserWarning from the metric", UserWarning)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(monai.metrics, "HausdorffDistanceMetric", NoisyHausdorff)
    case_metrics(*_masks())
    messages = {(w.category, str(w.message)) for w in recwarn.list}
    assert (FutureWarning, "another FutureWarning from the metric") in messages
    assert (UserWarning, "a UserWarning from the metric") in messages
    assert _future_numpy_warnings(recwarn.list) == []
    # and the filter does not outlive the call
    with pytest.warns(FutureWarning, match=NUMPY_WARNING):
        warnings.warn(f"x {NUMPY_WARNING} y", FutureWarning)
