"""Our methods as cases of PEFT's generic suite, and every exclusion with its reason (one place).

PEFT's small test models are MLPs (``MLP``: ``lin0`` 10->20, ``lin1`` 20->2; ``DeepMLP``; ``MLP_LayerNorm``), so
the cross-layer methods run with ``grouping="by_shape"`` here; the UNETR ``paper`` grouping needs UNETR module names
and runs in our own lifecycle matrix (``tests/test_lifecycle.py``) instead.
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

# Every exclusion, with its reason: (substring of the test id, reason). A test whose id contains the substring
# is skipped with that reason. Keep this list short and each reason specific.
_SERIAL = "HyPS serial branch is non-linear in the layer input: merging raises MergeError by design (tested)"
EXCLUSIONS: list[tuple[str, str]] = []
