"""PEFT's ``peft.helpers.disable_input_dtype_casting`` on every method, against LoRA's behaviour on the same model.

A float16/bfloat16 base gets float32 adapters (PEFT's ``autocast_adapter_dtype``). By default each layer casts its
input to the adapter's dtype. With casting disabled (for code that manages dtypes itself, e.g. layer-wise casting
hooks or ``torch.autocast``), the adapter gets the input in its own dtype: outside autocast the float32 adapter then
refuses a half-precision input, inside autocast it runs in the autocast dtype. LoRA does exactly this; so must
tCURLoRA, LoRA-PT (their factored path) and HyPS (Linear and convolution).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting

import peft_tensor  # noqa: F401  (registers the methods with PEFT)
from peft_tensor import HyPSConfig, LoraPTConfig, TCURLoraConfig
from peft_tensor._peft_compat import BaseTunerLayer
from tests._models import TinyMLP
from tests.tuners._helpers import mlp_input
from tests.tuners.hyps.test_hyps_conv import NET_TARGETS, TinyConvNet

LINEARS = ["lin1", "lin2", "lin3"]


def _conv_x():
    return torch.randn(3, 2, 3, 4, 3, generator=torch.Generator().manual_seed(1))


# name -> (model, input, config)
CASES = {
    "lora": (TinyMLP, lambda: mlp_input()["x"], lambda: LoraConfig(r=2, target_modules=LINEARS,
                                                                    init_lora_weights=False)),
    "lora_conv": (TinyConvNet, _conv_x, lambda: LoraConfig(r=2, target_modules=["enc", "mid"],
                                                           init_lora_weights=False)),
    "hyps": (TinyMLP, lambda: mlp_input()["x"], lambda: HyPSConfig(target_modules=LINEARS, init_weights=False)),
    "hyps_conv": (TinyConvNet, _conv_x, lambda: HyPSConfig(target_modules=NET_TARGETS, init_weights=False)),
    "tcurlora": (TinyMLP, lambda: mlp_input()["x"], lambda: TCURLoraConfig(r=3, target_modules=LINEARS,
                                                                            init_weights=False)),
    "lorapt": (TinyMLP, lambda: mlp_input()["x"], lambda: LoraPTConfig(r=2, target_modules=LINEARS,
                                                                        init_weights=False)),
    "lorapt_frozen_dense": (TinyMLP, lambda: mlp_input()["x"], lambda: LoraPTConfig(
        r=2, target_modules=LINEARS, init_weights=False, frozen_term="dense")),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_disabled_input_casting_behaves_as_for_lora(case, dtype):
    build, make_x, config = CASES[case]
    torch.manual_seed(0)
    pm = get_peft_model(build().to(dtype), config())
    adapters = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters), "PEFT upcasts the adapter to float32"
    layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer)]
    x = make_x().to(dtype)
    with torch.no_grad():
        cast = pm(x)
        with torch.autocast("cpu", dtype=dtype):
            cast_autocast = pm(x)
        assert cast.dtype == dtype and torch.isfinite(cast).all()

        with disable_input_dtype_casting(pm):
            assert not any(layer.cast_input_dtype_enabled for layer in layers)
            # the adapter now sees the half-precision input: a float32 adapter refuses it outside autocast ...
            with pytest.raises(RuntimeError, match="type"):
                pm(x)
            # ... and runs in the autocast dtype inside it, where casting first gives the same numbers
            with torch.autocast("cpu", dtype=dtype):
                assert torch.equal(pm(x), cast_autocast)
        assert all(layer.cast_input_dtype_enabled for layer in layers)
        assert torch.equal(pm(x), cast)


@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_tensor_method_convolutions_cast_no_input_so_the_switch_changes_nothing(method):
    """A tCURLoRA / LoRA-PT convolution runs ``conv(x, W + D)`` with ``D`` cast to the weight's dtype: the input is
    never cast to the adapter's dtype, so disabling input casting gives the same numbers."""
    config = (TCURLoraConfig if method == "tcurlora" else LoraPTConfig)(r=2, target_modules=["mid"],
                                                                         init_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(TinyConvNet().to(torch.bfloat16), config)
    x = _conv_x().to(torch.bfloat16)
    with torch.no_grad():
        expected = pm(x)
        with disable_input_dtype_casting(pm):
            assert torch.equal(pm(x), expected)
