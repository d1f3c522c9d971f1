"""Publishing and loading adapters through the real huggingface_hub client and a local Hub-compatible server.

Nothing in huggingface_hub is patched: in this process its module constants (endpoint, cache, Xet switch, token
path) point at the server in ``tests/hub/hub_server.py``; subprocesses get the same through environment variables
(``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_CACHE``), as a user would set them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model

from peft_tensor.errors import AdapterLoadError
from peft_tensor.hub import (
    KNOWN_PROVIDERS,
    BaseNetwork,
    HubPublishError,
    ProvenanceError,
    UnsafeWeightsError,
    adapter_info,
    build_adapter_card,
    describe_network,
    load_pretrained,
    push_base_weights,
    push_to_hub,
    record_network,
    save_base_weights,
    save_pretrained,
)
from peft_tensor.hub.cards import BASE_TAGS
from peft_tensor.hub.provenance import read_provenance

from tests._models import UNETR_TARGETS, tiny_unetr
from .hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[2]
UNETR_KWARGS = dict(in_channels=1, out_channels=2, img_size=[32, 32, 32], feature_size=8, hidden_size=96, mlp_dim=192,
                    num_heads=4, proj_type="conv", norm_name="instance", dropout_rate=0.0)
EVALUATION = {"dataset": "MNI152 hippocampus (toy)", "dataset_type": "mni152-hippocampus", "split": "test",
              "metrics": {"dice": 0.812, "hd95": 2.75}}
PROVENANCE = "peft_tensor.json"
TOKEN = "hf_testtoken_do_not_leak_0123456789"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@contextlib.contextmanager
def _client_constants(hub, home):
    """Point this process's huggingface_hub at the local server (module constants only; no function patched).

    Module-level shortcuts such as ``huggingface_hub.file_exists`` are bound to an ``HfApi`` built at import time
    and keep the import-time endpoint: code that uses them (PEFT's from_pretrained) is tested in a subprocess.
    """
    from huggingface_hub import constants

    home = Path(home)
    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    mp.delenv("HF_TOKEN", raising=False)
    for key in ("HF_ENDPOINT", "HF_HUB_OFFLINE"):
        mp.delenv(key, raising=False)
    try:
        yield hub
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def client(hub, tmp_path_factory):
    with _client_constants(hub, tmp_path_factory.mktemp("hf-home")):
        yield hub


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _input(seed: int = 123) -> torch.Tensor:
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(1, 1, 32, 32, 32, generator=gen)
        y = torch.randint(0, 2, (1, 32, 32, 32), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_input())


def _tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny UNETR base weights, saved once as safetensors with their sha256 reference."""
    d = tmp_path_factory.mktemp("base")
    return save_base_weights(record_network(tiny_unetr(), "monai.networks.nets.UNETR", **UNETR_KWARGS),
                             d / "model.safetensors")


def fresh_base():
    return record_network(tiny_unetr(), "monai.networks.nets.UNETR", **UNETR_KWARGS)


def make_lora(seed: int, steps: int = 1):
    model = get_peft_model(fresh_base(), LoraConfig(r=4, lora_alpha=8, target_modules=UNETR_TARGETS,
                                                    modules_to_save=["out.conv.conv"]))
    _train(model, steps, seed)
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights):
    """A LoRA adapter trained a few steps, saved with provenance + card; and its reference outputs."""
    model = make_lora(seed=1)
    d = tmp_path_factory.mktemp("adapter") / "lora"
    save_pretrained(model, d, base_weights=weights, training_data="Random volumes (test fixture).",
                    evaluation=EVALUATION, license="apache-2.0")
    return d, _outputs(model)


def _run(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------------ round trip
def test_round_trip_cli_push_then_fresh_process_load(hub, trained, weights, tmp_path):
    """`peft-tensor push` (HF_ENDPOINT + HF_TOKEN) -> load in a fresh process, empty cache -> identical outputs.

    The fresh process also runs the loading snippet of the downloaded model card exactly as written.
    """
    adapter_dir, expected = trained
    before = _tree_digest(adapter_dir)
    env = hub.client_env(str(tmp_path / "push-cache"), HF_TOKEN=TOKEN)
    push = _run("import sys; from peft_tensor.cli import main; sys.exit(main(sys.argv[1:]))".replace(
        "sys.argv[1:]", repr(["push", str(adapter_dir), "lab/unetr-lora", "--base-weights-repo", "lab/unetr-base"])),
        env)
    assert push.returncode == 0, push.stderr
    assert "pushed" in push.stdout and "lab/unetr-base" in push.stdout
    assert TOKEN in hub.seen_tokens, "the token from HF_TOKEN was not sent"
    assert TOKEN not in push.stdout + push.stderr
    assert _tree_digest(adapter_dir) == before  # pushing never modifies the local directory
    files = hub.files("lab/unetr-lora")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", PROVENANCE} <= set(files)
    assert len(hub.repos["lab/unetr-lora"].commits) == 2  # initial + exactly one commit
    record = json.loads(files[PROVENANCE])
    assert record["base_network"]["weights"]["repo_id"] == "lab/unetr-base"
    assert record["base_network"]["weights"]["revision"] == hub.head("lab/unetr-base")

    # a tCURLoRA adapter too, to check PEFT's own loader on our method in the fresh process
    from peft_tensor import TCURLoraConfig

    tcur = get_peft_model(fresh_base(), TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper"))
    _train(tcur, 1, seed=8)
    with _client_constants(hub, tmp_path / "push2-home"):
        push_to_hub(tcur, "lab/unetr-tcurlora-peft", base_weights=weights)
    torch.save({"lora": expected, "tcur": _outputs(tcur)}, tmp_path / "expected.pt")
    cache = tmp_path / "fresh-cache"
    code = f"""
import re, torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from peft import PeftModel
from peft_tensor.hub import load_pretrained
from tests._models import tiny_unetr
from tests._numerics import UNETR_DEPTH, assert_float32_close
x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(123))
expected = torch.load({str(tmp_path / 'expected.pt')!r})
def base():
    net = tiny_unetr()
    net.load_state_dict(load_file({str(weights.path)!r}))
    return net
loaded = {{
    "load_pretrained": (load_pretrained("lab/unetr-lora"), "lora"),
    "PeftModel.from_pretrained": (PeftModel.from_pretrained(base(), "lab/unetr-lora"), "lora"),
    "load_pretrained tcurlora": (load_pretrained("lab/unetr-tcurlora-peft"), "tcur"),
    "PeftModel.from_pretrained tcurlora": (PeftModel.from_pretrained(base(), "lab/unetr-tcurlora-peft"), "tcur"),
}}
for name, (model, key) in loaded.items():
    with torch.no_grad():
        out = model.eval()(x)
    # another process: MKL may split the reductions over other threads, so equal up to float32 rounding
    assert_float32_close(out, expected[key], depth=UNETR_DEPTH, msg=name)
card = open(hf_hub_download("lab/unetr-lora", "README.md")).read()
snippet = re.search(r"```python\\n(.*?)```", card, re.S).group(1)
exec(compile(snippet, "model-card-snippet", "exec"), {{}})
print("ROUND_TRIP_OK")
"""
    load = _run(code, hub.client_env(str(cache)))
    assert load.returncode == 0, load.stderr[-3000:]
    assert "ROUND_TRIP_OK" in load.stdout and "torch.Size([1, 2, 32, 32, 32])" in load.stdout
    assert not any(TOKEN.encode() in p.read_bytes() for p in Path(tmp_path).rglob("*") if p.is_file())


def test_second_push_then_first_revision_returns_first_adapter(client, trained, weights, cache):
    adapter_dir, expected_first = trained
    first = push_to_hub(adapter_dir, "lab/versions")
    second_model = make_lora(seed=2, steps=1)
    expected_second = _outputs(second_model)
    second = push_to_hub(second_model, "lab/versions", base_weights=weights)
    assert first.commit_sha != second.commit_sha
    latest = load_pretrained("lab/versions", cache_dir=cache)
    pinned = load_pretrained("lab/versions", revision=first.commit_sha, cache_dir=cache)
    assert torch.equal(_outputs(latest), expected_second)
    assert torch.equal(_outputs(pinned), expected_first)


def test_offline_load_from_cache(client, trained, cache):
    from huggingface_hub import constants

    adapter_dir, expected = trained
    push_to_hub(adapter_dir, "lab/offline")
    load_pretrained("lab/offline", cache_dir=cache)  # fills the cache
    n_requests = len(client.log)
    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    try:
        model = load_pretrained("lab/offline", cache_dir=cache)
        with pytest.raises(AdapterLoadError, match="not in the local cache"):
            load_pretrained("lab/never-downloaded", cache_dir=cache)
    finally:
        mp.undo()
    assert len(client.log) == n_requests, "offline loading talked to the server"
    assert torch.equal(_outputs(model), expected)


def test_several_adapters_from_one_repo(client, weights, tmp_path, cache):
    model = make_lora(seed=3, steps=1)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["attn.qkv"], init_lora_weights=False))
    model.set_adapter("second")
    expected_second = _outputs(model)
    model.set_adapter("default")
    expected_default = _outputs(model)
    save_pretrained(model, tmp_path / "multi", base_weights=weights)
    push_to_hub(tmp_path / "multi", "lab/multi")
    assert "second/adapter_model.safetensors" in client.files("lab/multi")

    both = load_pretrained("lab/multi", adapters={"default": None, "second": "second"}, cache_dir=cache)
    assert torch.equal(_outputs(both), expected_default)
    both.set_adapter("second")
    assert torch.equal(_outputs(both), expected_second)
    only_second = load_pretrained("lab/multi", subfolder="second", adapter_name="second", cache_dir=cache)
    assert torch.equal(_outputs(only_second), expected_second)


def test_peft_native_lora_adapter(client, weights, tmp_path, cache):
    """A plain PEFT LoRA folder (no provenance), uploaded with the plain client, loads through load_pretrained."""
    from safetensors.torch import load_file

    model = make_lora(seed=4, steps=1)
    expected = _outputs(model)
    model.save_pretrained(tmp_path / "native")  # PEFT alone: no peft_tensor.json
    api = HfApi()
    api.create_repo("community/native-lora")
    api.upload_folder(repo_id="community/native-lora", folder_path=tmp_path / "native")

    def base_with_weights():
        base = tiny_unetr()
        base.load_state_dict(load_file(weights.path))
        return base

    with pytest.raises(AdapterLoadError, match="base_model="):
        load_pretrained("community/native-lora", cache_dir=cache)
    loaded = load_pretrained("community/native-lora", base_model=base_with_weights(), cache_dir=cache)
    assert torch.equal(_outputs(loaded), expected)



@pytest.mark.parametrize("method", ["tcurlora", "lorapt"])
def test_tensor_methods_round_trip(client, weights, tmp_path, cache, method):
    from peft_tensor import LoraPTConfig, TCURLoraConfig

    config = (TCURLoraConfig(r=4, target_modules=UNETR_TARGETS, grouping="paper") if method == "tcurlora"
              else LoraPTConfig(r=2, target_modules=UNETR_TARGETS))
    model = get_peft_model(fresh_base(), config)
    _train(model, 1, seed=5)
    expected = _outputs(model)
    result = push_to_hub(model, f"lab/unetr-{method}", base_weights=weights, evaluation=EVALUATION)
    card = ModelCard(client.files(f"lab/unetr-{method}")["README.md"].decode())
    assert method in card.data.tags
    loaded = load_pretrained(f"lab/unetr-{method}", revision=result.commit_sha, cache_dir=cache)
    assert torch.equal(_outputs(loaded), expected)
    info = adapter_info(f"lab/unetr-{method}", cache_dir=cache)
    assert info["method"] == method.upper() and info["groups"]


# ------------------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("fault, message", [("commit_500", "HTTP 500"), ("commit_cut", "broke off")])
def test_failed_commit_is_clear_and_changes_nothing(client, trained, fault, message):
    adapter_dir, _ = trained
    repo = f"lab/faults-{fault}"
    HfApi().create_repo(repo)
    head = client.head(repo)
    before = _tree_digest(adapter_dir)
    client.fail_next(fault)
    with pytest.raises(HubPublishError, match=message) as err:
        push_to_hub(adapter_dir, repo, commit_message="should not land")
    assert fault not in client.faults
    assert "Nothing was committed" in str(err.value) and "unchanged" in str(err.value)
    assert client.head(repo) == head and set(client.files(repo)) == {".gitattributes"}
    assert _tree_digest(adapter_dir) == before
    assert push_to_hub(adapter_dir, repo).commit_sha == client.head(repo)  # pushing again works


def test_upload_cut_midway_then_retried_by_client(client, weights, tmp_path):
    """A connection dropped halfway through the LFS upload is retried by huggingface_hub; the commit lands once."""
    torch.manual_seed(99)  # fresh adapter bytes, so the LFS object is new to the server
    model = get_peft_model(fresh_base(), LoraConfig(r=3, target_modules=["attn.qkv"], init_lora_weights=False))
    save_pretrained(model, tmp_path / "flaky", base_weights=weights)
    client.fail_next("lfs_put_cut")
    result = push_to_hub(tmp_path / "flaky", "lab/flaky")
    assert "lfs_put_cut" not in client.faults
    assert client.head("lab/flaky") == result.commit_sha
    assert len(client.repos["lab/flaky"].commits) == 2
    pushed = client.files("lab/flaky")["adapter_model.safetensors"]
    assert pushed == (tmp_path / "flaky" / "adapter_model.safetensors").read_bytes()


def test_missing_repo(client, trained, cache):
    adapter_dir, _ = trained
    before = _tree_digest(adapter_dir)
    with pytest.raises(HubPublishError, match="not found") as err:
        push_to_hub(adapter_dir, "nobody/missing", create_repo=False)
    assert "unchanged" in str(err.value)
    assert _tree_digest(adapter_dir) == before
    with pytest.raises(AdapterLoadError, match="not found"):
        load_pretrained("nobody/missing", cache_dir=cache)
    push_to_hub(adapter_dir, "lab/revs")
    with pytest.raises(AdapterLoadError, match="Revision"):
        load_pretrained("lab/revs", revision="0" * 40, cache_dir=cache)


# ------------------------------------------------------------------------------------------------------ safety
def test_token_reaches_the_server_but_not_logs_or_files(client, trained, tmp_path, caplog):
    import logging

    adapter_dir, _ = trained
    before = _tree_digest(adapter_dir)
    with caplog.at_level(logging.DEBUG):
        push_to_hub(adapter_dir, "lab/token", token=TOKEN)
        load_pretrained("lab/token", token=TOKEN, cache_dir=str(tmp_path / "cache"))
    assert TOKEN in client.seen_tokens
    assert TOKEN not in caplog.text
    assert _tree_digest(adapter_dir) == before
    assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert all(TOKEN.encode() not in data for data in client.files("lab/token").values())


def test_pickle_only_repo_refused_unless_opted_in(client, weights, tmp_path, cache):
    from safetensors.torch import load_file

    model = make_lora(seed=6, steps=1)
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    HfApi().create_repo("community/pickled")
    HfApi().upload_folder(repo_id="community/pickled", folder_path=tmp_path / "pickled")
    base = tiny_unetr()
    base.load_state_dict(load_file(weights.path))
    with pytest.raises(UnsafeWeightsError, match="allow_pickle=True"):
        load_pretrained("community/pickled", base_model=base, cache_dir=cache)
    assert not any(hasattr(m, "base_layer") for m in base.modules())
    loaded = load_pretrained("community/pickled", base_model=base, allow_pickle=True, cache_dir=cache)
    assert torch.equal(_outputs(loaded), _outputs(model.eval()))


def test_shapes_checked_before_the_model_is_touched(trained):
    adapter_dir, _ = trained
    small = tiny_unetr(num_layers=6)
    snapshot = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="vit.blocks.6") as err:
        load_pretrained(adapter_dir, base_model=small)
    assert "nothing was modified" in str(err.value)
    assert list(small.state_dict()) == list(snapshot)
    assert all(torch.equal(small.state_dict()[k], v) for k, v in snapshot.items())

    from monai.networks.nets import UNETR

    wider = UNETR(**{**UNETR_KWARGS, "hidden_size": 48, "mlp_dim": 96})
    with pytest.raises(AdapterLoadError, match="adapter expects"):
        load_pretrained(adapter_dir, base_model=wider)


def test_unknown_peft_type_names_its_provider(trained, tmp_path, monkeypatch):
    import shutil

    adapter_dir, _ = trained
    copy = Path(shutil.copytree(adapter_dir, tmp_path / "copy"))
    config = json.loads((copy / "adapter_config.json").read_text())
    config["peft_type"] = "FANCYLORA"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="FANCYLORA.*peft 0.21"):
        load_pretrained(copy)
    monkeypatch.setitem(KNOWN_PROVIDERS, "FANCYLORA", "peft-fancy")
    with pytest.raises(AdapterLoadError, match="pip install peft-fancy"):
        load_pretrained(copy)


def test_base_weights_hash_is_checked(trained, tmp_path):
    import shutil

    adapter_dir, _ = trained
    copy = Path(shutil.copytree(adapter_dir, tmp_path / "copy"))
    record = read_provenance(copy)
    record["base_network"]["weights"]["sha256"] = "0" * 64
    (copy / PROVENANCE).write_text(json.dumps(record))
    with pytest.raises(AdapterLoadError, match="sha256"):
        load_pretrained(copy)


def test_untrusted_base_class_is_never_called():
    with pytest.raises(ProvenanceError, match="trusted"):
        BaseNetwork("os.system", {"command": "echo pwned"}).build()
    with pytest.raises(ProvenanceError, match="not a torch.nn.Module"):
        BaseNetwork("torch.zeros", {}).build()


def test_provenance_capture():
    with pytest.raises(ProvenanceError, match="differ"):
        record_network(tiny_unetr(), "monai.networks.nets.UNETR", **{**UNETR_KWARGS, "mlp_dim": 96})
    with pytest.raises(ProvenanceError, match="build_network"):
        describe_network(tiny_unetr())
    spec = describe_network(get_peft_model(fresh_base(), LoraConfig(r=2, target_modules=["attn.qkv"])))
    assert spec.cls == "monai.networks.nets.UNETR" and spec.kwargs["hidden_size"] == 96


# ------------------------------------------------------------------------------------------------------ cards & info
def test_card_metadata_validated(client, trained):
    adapter_dir, _ = trained
    card = build_adapter_card(adapter_dir, read_provenance(adapter_dir), repo_id="lab/unetr-lora")
    card.validate()  # the server's /api/validate-yaml, as huggingface_hub calls it before a push
    data = card.data
    assert data.library_name == "peft-tensor" and data.pipeline_tag == "image-segmentation"
    assert {"peft-tensor", "lora", "medical-imaging", "segmentation", "monai"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in ModelCard(str(card)).data.eval_results}
    assert results == {"dice": 0.812, "hd95": 2.75}
    text = str(card)
    for needle in ("monai.networks.nets.UNETR", "55,314 trainable", "Random volumes", "Research use only",
                   "not been validated for clinical use", 'load_pretrained("lab/unetr-lora")'.replace('"', "'"),
                   "| `r` | `4` |"):
        assert needle in text, needle
    broken = ModelCard(text.replace("value: 0.812", "value: [0.812]", 1))
    with pytest.raises(ValueError, match="value"):
        broken.validate()


def test_base_weights_card_has_the_common_tags(client, trained, weights):
    """The base-weights card (model_cards/base_weights_card.md) carries exactly cards.BASE_TAGS, the tags every
    adapter card starts from, and the adapter cards' library_name and pipeline_tag."""
    adapter_dir, _ = trained
    record = read_provenance(adapter_dir)
    ref = push_base_weights(weights.path, "lab/base-card", base_network=record["base_network"], license="mit")
    card = ModelCard(client.files("lab/base-card")["README.md"].decode())
    assert card.data.tags == BASE_TAGS
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == (
        "peft-tensor", "image-segmentation", "mit")
    assert "# Base weights" in card.text and f"`model.safetensors`: sha256 `{ref.sha256}`" in card.text
    assert "monai.networks.nets.UNETR" in card.text and "not for clinical use" in card.text
    adapter = build_adapter_card(adapter_dir, record, repo_id="lab/unetr-lora")
    assert set(BASE_TAGS) <= set(adapter.data.tags)


def test_info_for_directory_and_repo(client, trained, capsys):
    from peft_tensor.cli import main

    adapter_dir, _ = trained
    push_to_hub(adapter_dir, "lab/info")
    local = adapter_info(adapter_dir)
    assert local["method"] == "LORA" and local["trainable_params"] == 55314
    assert "48 adapted modules" in local["groups"][0]
    assert main(["info", "lab/info"]) == 0
    out = capsys.readouterr().out
    for needle in ("LORA", "monai.networks.nets.UNETR", "48 adapted modules", "adapter_model.safetensors",
                   "Dice = 0.812", "55,314 trainable"):
        assert needle in out, needle
    assert main(["info", "nobody/nothing"]) == 1
    assert "not found" in capsys.readouterr().err
