"""load_network("user/repo"): the base network of a shared adapter, rebuilt from the repo's peft_tensor.json with its
base weights from their own Hub repo (local Hub server of tests/hub, the real huggingface_hub client)."""

from __future__ import annotations

import pytest

from peft_tensor.networks import NetworkLoadError, load_network

from ..hub.hub_server import HubServer
from ..hub.test_hub import _client_constants
from ._nets import UNETR, build, same_tensors, unetr_kwargs


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with HubServer() as server, _client_constants(server, tmp_path_factory.mktemp("hf-home")):
        yield server


def test_base_network_of_a_shared_adapter_by_repo_id(client, tmp_path):
    from peft import get_peft_model

    from peft_tensor import TCURLoraConfig
    from peft_tensor.hub import push_to_hub, save_base_weights, save_pretrained

    base = build(UNETR, unetr_kwargs(), seed=4)
    weights = save_base_weights(base, tmp_path / "base" / "model.safetensors")
    model = get_peft_model(base, TCURLoraConfig(r=2, target_modules=["attn.qkv"], modules_to_save=["out.conv.conv"]))
    save_pretrained(model, tmp_path / "adapter", base_weights=weights, training_data="test fixture")
    push_to_hub(tmp_path / "adapter", "someone/unetr-adapter", base_weights_repo="someone/unetr-base")
    (tmp_path / "base" / "model.safetensors").unlink()  # only the Hub copy is left

    net, report = load_network("someone/unetr-adapter")
    assert report.complete and report.network == UNETR
    assert same_tensors(build(UNETR, unetr_kwargs(), seed=4).state_dict(), net.state_dict())
    assert "peft_tensor.json" in report.layout[0]
    with pytest.raises(NetworkLoadError, match="someone/missing"):
        load_network("someone/missing")
