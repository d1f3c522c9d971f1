"""Our methods as cases of PEFT's generic suite, and every exclusion with its reason (one place).

PEFT's small test models are MLPs (``MLP``: ``lin0`` 10->20, ``lin1`` 20->2; ``DeepMLP``; ``MLP_LayerNorm``), so
the cross-layer methods run with ``grouping="by_shape"`` here; the UNETR ``paper`` grouping needs UNETR module names
and runs in our own lifecycle matrix (``tests/tuners/test_lifecycle.py``) instead.
"""

from __future__ import annotations

from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig

# (test name, model id, config class, config kwargs) -- the shape of upstream's TEST_CASES
TEST_CASES = []
for _name, _cls, _extra in (
    ("tCURLoRA", TCURLoraConfig, {"r": 2}),
    ("LoRA-PT", LoraPTConfig, {"r": 2}),
    ("LoRA-PT diag", LoraPTConfig, {"r": 2, "core": "diagonal"}),
    ("HyPS", HyPSConfig, {"r": 2, "d": 2}),
    ("HyPS parallel", HyPSConfig, {"r": 2, "serial": False}),
):
    TEST_CASES += [
        (f"Vanilla MLP 1 {_name}", "MLP", _cls, {"target_modules": ["lin0"], **_extra}),
        (f"Vanilla MLP 2 {_name}", "MLP", _cls, {"target_modules": ["lin0", "lin1"], **_extra}),
        (f"Vanilla MLP 3 {_name}", "MLP", _cls, {"target_modules": "lin.*", "modules_to_save": ["lin1"], **_extra}),
    ]

# Convolution targets (issue 12) on upstream's convolutional test models: Conv1d(1, 1, 2), Conv2d(5, 10, 3) (+ lin0),
# Conv3d(5, 10, 3), Conv2d 1x1 (1 -> 10: rank 1 at most); kernel layout (K kernel positions as slices) and stacked.
# LoRA-PT shares the convolution code with tCURLoRA (tuners/tensor_group/): two cases suffice for it.
TEST_CASES += [
    ("Conv1d tCURLoRA", "Conv1d", TCURLoraConfig, {"target_modules": ["conv1d"], "r": 1}),
    ("Conv2d 2 tCURLoRA", "Conv2d", TCURLoraConfig, {"target_modules": ["conv2d", "lin0"], "r": 2}),
    ("Conv2d stacked tCURLoRA", "Conv2d", TCURLoraConfig, {"target_modules": ["conv2d"], "r": 2,
                                                           "conv_layout": "stacked"}),
    ("Conv3d 1 tCURLoRA", "Conv3d", TCURLoraConfig, {"target_modules": ["conv3d"], "r": 2}),
    ("Conv2d 1x1 tCURLoRA", "Conv2d1x1", TCURLoraConfig, {"target_modules": ["conv2d"], "r": 1}),
    ("Conv2d 2 LoRA-PT", "Conv2d", LoraPTConfig, {"target_modules": ["conv2d", "lin0"], "r": 2, "svd_method": "full"}),
    ("Conv3d 1 LoRA-PT", "Conv3d", LoraPTConfig, {"target_modules": ["conv3d"], "r": 2, "svd_method": "full"}),
]
# HyPS on convolutions (its own conv layer, tuners/hyps): with the serial branch and parallel-only.
for _name, _extra in (("HyPS", {"d": 2}), ("HyPS parallel", {"serial": False})):
    TEST_CASES += [
        (f"Conv1d {_name}", "Conv1d", HyPSConfig, {"target_modules": ["conv1d"], "r": 1, **_extra}),
        (f"Conv2d 1 {_name}", "Conv2d", HyPSConfig, {"target_modules": ["conv2d"], "r": 2, **_extra}),
        (f"Conv2d 2 {_name}", "Conv2d", HyPSConfig, {"target_modules": ["conv2d", "lin0"], "r": 2, **_extra}),
        (f"Conv2d 1x1 {_name}", "Conv2d1x1", HyPSConfig, {"target_modules": ["conv2d"], "r": 1, **_extra}),
        (f"Conv3d 1 {_name}", "Conv3d", HyPSConfig, {"target_modules": ["conv3d"], "r": 2, **_extra}),
        (f"Conv3d 2 {_name}", "Conv3d", HyPSConfig, {"target_modules": ["conv3d", "lin0"], "r": 2, **_extra}),
    ]

# (test name, tuner method, config class, 1st config kwargs, 2nd config kwargs), model: MLP
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = []
for _name, _cls, _extra in (
    ("tCURLoRA", TCURLoraConfig, {"r": 2, "init_weights": False}),
    ("LoRA-PT", LoraPTConfig, {"r": 2, "init_weights": False}),
    ("HyPS", HyPSConfig, {"r": 2, "d": 2, "init_weights": False}),
    ("HyPS parallel", HyPSConfig, {"r": 2, "serial": False, "init_weights": False}),
):
    MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES += [
        (f"{_name} Same", _name.lower(), _cls, {"target_modules": ["lin0"], **_extra},
         {"target_modules": ["lin0"], **_extra}),
        (f"{_name} Different", _name.lower(), _cls, {"target_modules": ["lin0"], **_extra},
         {"target_modules": ["lin1"], **_extra}),
    ]

# (test name, config0, config1), model: MLP, mixed adapter_names batches
MIXED_ADAPTER_TEST_CASES = [
    ("tCURLoRA mixed adapter", TCURLoraConfig(target_modules=["lin0"], r=2, init_weights=False),
     TCURLoraConfig(target_modules=["lin0"], r=3, init_weights=False)),
    ("LoRA-PT mixed adapter", LoraPTConfig(target_modules=["lin0"], r=2, init_weights=False),
     LoraPTConfig(target_modules=["lin0", "lin1"], r=1, init_weights=False)),
    ("HyPS mixed adapter", HyPSConfig(target_modules=["lin0"], r=2, d=2, init_weights=False),
     HyPSConfig(target_modules=["lin0"], r=1, d=4, init_weights=False)),
]

# Every exclusion, with its reason: (test-name substring, case substring, reason). A collected test whose id contains
# both substrings is skipped with that reason. Keep this list short and each reason specific.
_SERIAL = ("HyPS with its serial branch (y = h + s Up(ReLU(Down(h)))) is non-linear in the layer input, so merging "
           "raises MergeError by design (tests/tuners/hyps/test_hyps.py checks the error; HyPS parallel runs "
           "these tests)")
_HYPS_SERIAL_CASES = ("HyPS-MLP", "HyPS Same", "HyPS Different", "HyPS mixed adapter", "HyPS-Conv1d", "HyPS-Conv2d",
                      "HyPS-Conv3d")
_MERGING_TESTS = (
    "test_merge_layers", "test_safe_merge", "test_disable_adapters_with_merging", "test_delete_merged_adapter",
    "test_forward_float16", "test_forward_bfloat16", "test_multiple_active_adapters_merge_and_unmerge",
    "test_sequential_merge_matches_batch_merge", "test_unmerge_after_sequential_merge_restores_base",
    "test_mixed_adapter_batches_merged_raises",
)
EXCLUSIONS: list[tuple[str, str, str]] = [(t, c, _SERIAL) for t in _MERGING_TESTS for c in _HYPS_SERIAL_CASES]
# Measured (CPU, this case's seed): plain SGD at lr 0.5 on inputs up to 89 diverges within 3 steps for every method on
# lin0+lin1, PEFT LoRA included (its lora_B gradient is inf at step 3, and allclose(inf, inf) passes); HyPS serial's
# ReLU branch turns the inf into NaN, which the test's allclose(NaN, NaN) fails. Not a save/load defect.
EXCLUSIONS.append(("test_parameters_after_loading_model", "Vanilla MLP 2 HyPS-MLP",
                   "SGD lr 0.5 on inputs up to 89 diverges for every method incl. LoRA (inf); HyPS serial reaches "
                   "NaN, "
                   "and allclose(NaN, NaN) is False"))
# Measured: SGD lr 0.5 on sum(log_softmax) of the conv models diverges for every method (PEFT LoRA on Conv2d: loss
# -3.9e21, |grad| 5e17 at step 3); HyPS serial turns the inf into NaN. Not a save/load defect.
for _case in ("Conv2d 2 HyPS-Conv2d", "Conv3d 2 HyPS-Conv3d"):
    EXCLUSIONS.append(("test_parameters_after_loading_model", _case,
                       "SGD lr 0.5 diverges on this conv model for every method incl. LoRA (inf); HyPS serial "
                       "reaches NaN, and allclose(NaN, NaN) is False"))
