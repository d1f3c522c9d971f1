"""load_network: every source and checkpoint layout, written here as fixtures (no download), the report, strict mode,
shape mismatches and the refusal of pickles."""

from __future__ import annotations

import json
import re

import pytest
import torch

from peft_tensor.networks import LoadReport, NetworkLoadError, load_network

from ._nets import SWIN, UNETR, build, same_tensors, swin_kwargs, unetr_kwargs


@pytest.fixture(scope="module")
def unetr_src():
    return build(UNETR, unetr_kwargs(), seed=1)


def _save(obj, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


LAYOUTS = {
    "flat.pt": lambda sd: sd,
    "flat.safetensors": lambda sd: sd,
    "nested_state_dict.pth": lambda sd: {"state_dict": sd, "epoch": 7, "best_metric": 0.8},
    "nested_model.pt": lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
    "nested_net.pt": lambda sd: {"net": sd},
    "nested_network.pt": lambda sd: {"network": sd},
    "dataparallel.pth": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "lightning.ckpt": lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                                  "global_step": 120},
    "compiled_ddp.pt": lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layouts_load_every_tensor(tmp_path, unetr_src, layout):
    sd = unetr_src.state_dict()
    path = _save(LAYOUTS[layout](sd), tmp_path / layout)
    net, report = load_network(path, network=UNETR, **unetr_kwargs())
    assert isinstance(report, LoadReport) and report.complete, str(report)
    assert len(report.loaded) == len(sd)
    assert same_tensors(sd, net.state_dict())


def test_network_as_module_and_spec(tmp_path, unetr_src):
    path = _save(unetr_src.state_dict(), tmp_path / "w.pt")
    target = build(UNETR, unetr_kwargs(), seed=5)
    net, report = load_network(path, network=target)
    assert net is target and report.complete and same_tensors(unetr_src.state_dict(), net.state_dict())
    net2, _ = load_network(path, network={"_target_": "UNETR", **unetr_kwargs()})
    assert same_tensors(unetr_src.state_dict(), net2.state_dict())
    with pytest.raises(NetworkLoadError, match="already built"):
        load_network(path, network=target, out_channels=3)


def test_mismatched_head_stays_initialised_and_strict_raises(tmp_path):
    src = build(UNETR, unetr_kwargs(out_channels=14), seed=1)
    path = _save({"state_dict": src.state_dict()}, tmp_path / "btcv14.pt")
    fresh = build(UNETR, unetr_kwargs(out_channels=2), seed=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(NetworkLoadError, match="strict") as err:
        load_network(path, network=fresh, strict=True)
    assert "out.conv.conv.weight" in str(err.value) and same_tensors(before, fresh.state_dict())  # untouched
    net, report = load_network(path, network=fresh)
    assert [m[0] for m in report.mismatched] == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert report.mismatched[0][1:] == ((14, 8, 1, 1, 1), (2, 8, 1, 1, 1))
    assert not report.missing and not report.unexpected
    state = net.state_dict()
    assert torch.equal(state["out.conv.conv.weight"], before["out.conv.conv.weight"])
    rest = [k for k in state if not k.startswith("out.")]
    assert same_tensors(src.state_dict(), state, rest)
    text = str(report)
    assert "mismatched" in text and "(14, 8, 1, 1, 1) vs (2, 8, 1, 1, 1)" in text and "fresh initialisation" in text
    assert json.dumps(report.to_dict())


def _ssl_swinvit(src) -> dict:
    """MONAI's model_swinvit.pt layout, the keys SwinUNETR.load_from reads: state_dict -> module.<encoder key>, timm
    MLP names fc1/fc2; plus the self-supervised heads of research-contributions' SSLHead."""
    sd = {}
    for k, v in src.swinViT.state_dict().items():
        sd["module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")] = v
    dim = 16 * 12
    sd["module.rotation_head.weight"], sd["module.rotation_head.bias"] = torch.randn(4, dim), torch.randn(4)
    sd["module.contrastive_head.weight"] = torch.randn(512, dim)
    sd["module.contrastive_head.bias"] = torch.randn(512)
    return {"state_dict": sd}


def test_swinunetr_self_supervised_layout_matches_monai_load_from(tmp_path):
    src = build(SWIN, swin_kwargs(), seed=1)
    ckpt = _ssl_swinvit(src)
    path = _save(ckpt, tmp_path / "model_swinvit.pt")
    net, report = load_network(path, network=SWIN, **swin_kwargs(out_channels=3))
    oracle = build(SWIN, swin_kwargs(out_channels=3), seed=0)
    oracle.load_from(ckpt)  # MONAI's own reader of this file
    assert same_tensors(oracle.swinViT.state_dict(), net.swinViT.state_dict())
    assert len(report.loaded) == len(src.swinViT.state_dict())
    assert sorted(report.unexpected) == ["contrastive_head.bias", "contrastive_head.weight", "rotation_head.bias",
                                         "rotation_head.weight"]
    assert report.missing and all(not k.startswith("swinViT.") for k in report.missing)  # the decoder
    assert any("self-supervised" in line for line in report.layout)
    assert any("rotation_head" in n and "not loaded" in n for n in report.notes)


def test_swinunetr_ssl_training_output_layout(tmp_path):
    """The pretraining script's own checkpoint: DataParallel SSLHead, encoder under swin_vit., MONAI MLP names."""
    src = build(SWIN, swin_kwargs(), seed=1)
    sd = {f"module.swin_vit.{k}": v for k, v in src.swinViT.state_dict().items()}
    sd["module.conv.0.weight"] = torch.randn(96, 192, 3, 3, 3)
    path = _save({"epoch": 100, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "m.pt")
    net, report = load_network(path, network=SWIN, **swin_kwargs(use_v2=True))
    assert same_tensors(src.swinViT.state_dict(), net.swinViT.state_dict())
    assert report.unexpected == ["conv.0.weight"]
    assert any(k.startswith("swinViT.layers1c") for k in report.missing)  # v2's extra encoder blocks


def test_pickled_module_is_refused_unless_allowed(tmp_path, unetr_src):
    path = tmp_path / "whole.pt"
    torch.save(unetr_src, path)
    with pytest.raises(NetworkLoadError, match="allow_pickle=True") as err:
        load_network(path, network=UNETR, **unetr_kwargs())
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no deep torch trace attached
    assert "monai.networks.nets.unetr.UNETR" in str(err.value)
    net, report = load_network(path, allow_pickle=True)
    assert type(net).__name__ == "UNETR" and report.complete
    net2, report2 = load_network(path, network=UNETR, allow_pickle=True, **unetr_kwargs(out_channels=3))
    assert len(report2.mismatched) == 2


def _write_bundle(folder, network_def: dict, state, *, yaml: bool = False, extra: dict | None = None):
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    config = {"spatial": 16, "channels": {"out": 2}, "network_def": network_def, **(extra or {})}
    if yaml:
        import yaml as _yaml

        (folder / "configs" / "inference.yaml").write_text(_yaml.safe_dump(config))
    else:
        (folder / "configs" / "inference.json").write_text(json.dumps(config))
    torch.save(state, folder / "models" / "model.pt")
    return folder


def test_bundle_folder_refs_overrides_and_stale_arguments(tmp_path, unetr_src):
    kw = unetr_kwargs()
    netdef = {"_target_": "UNETR", **kw, "img_size": ["@spatial", "@spatial", "@spatial"],
              "out_channels": "@channels::out"}
    bundle = _write_bundle(tmp_path / "b1", netdef, {"model": unetr_src.state_dict()})
    net, report = load_network(bundle)
    assert report.complete and same_tensors(unetr_src.state_dict(), net.state_dict())
    assert report.network == UNETR and report.weights.endswith("models/model.pt")
    assert load_network(bundle / "configs" / "inference.json")[1].complete  # the config file names its bundle
    net3, report3 = load_network(bundle, out_channels=3)  # a new head: reported, freshly initialised
    assert net3.out.conv.conv.out_channels == 3 and len(report3.mismatched) == 2
    swin_src = build(SWIN, swin_kwargs(), seed=3)
    zoo_like = {"imports": ["$import glob"], "device": "$torch.device('cpu')",  # model-zoo style: never evaluated
                "network": "$@network_def.to(@device)", "run": ["$@evaluator.run()"]}
    stale = _write_bundle(tmp_path / "b2", {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": 96,
                                            "use_checkpoint": False, **swin_kwargs()},
                          swin_src.state_dict(), yaml=True, extra=zoo_like)
    net, report = load_network(stale)  # img_size: an argument this MONAI's SwinUNETR no longer takes
    assert report.complete and any("dropped img_size=96" in n for n in report.notes)
    ref = _write_bundle(tmp_path / "b5", {"_target_": "UNETR", **kw, "out_channels": "$@channels#out"},
                        unetr_src.state_dict())
    net, report = load_network(ref)  # "$@id" is only a reference: read
    assert report.complete
    code = _write_bundle(tmp_path / "b3", {"_target_": "UNETR", **kw, "out_channels": "$int('2')"},
                         unetr_src.state_dict())
    with pytest.raises(NetworkLoadError, match="Python expression"):
        load_network(code)
    outside = _write_bundle(tmp_path / "b4", {"_target_": "collections.OrderedDict"}, unetr_src.state_dict())
    with pytest.raises(ValueError, match="outside the trusted packages"):
        load_network(outside)


def test_bundle_name_from_the_offline_cache(tmp_path, unetr_src, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub" / "bundle"
    _write_bundle(cache / "tiny_unetr_bundle", {"_target_": UNETR, **unetr_kwargs()}, unetr_src.state_dict())
    net, report = load_network("tiny_unetr_bundle", bundle_dir=cache)
    assert report.complete and same_tensors(unetr_src.state_dict(), net.state_dict())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # MONAI's default cache: <torch.hub.get_dir()>/bundle
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    net, report = load_network("tiny_unetr_bundle")
    assert report.complete
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NetworkLoadError, match="not in the bundle cache"):
        load_network("no_such_bundle", bundle_dir=cache)


def test_provenance_and_backbone_folders(tmp_path, unetr_src):
    from peft_tensor.hub.provenance import PROVENANCE_FILE, BaseNetwork, save_base_weights
    from peft_tensor.training.models import save_backbone

    ref = save_base_weights(unetr_src, tmp_path / "base" / "model.safetensors")
    folder = tmp_path / "adapter"
    folder.mkdir()
    record = {"format_version": 1, "base_network": BaseNetwork(UNETR, unetr_kwargs(), weights=ref).to_dict()}
    (folder / PROVENANCE_FILE).write_text(json.dumps(record))
    net, report = load_network(folder)
    assert report.complete and same_tensors(unetr_src.state_dict(), net.state_dict())
    record["base_network"]["weights"]["sha256"] = "0" * 64
    (folder / PROVENANCE_FILE).write_text(json.dumps(record))
    with pytest.raises(NetworkLoadError, match="sha256"):
        load_network(folder)
    cfg = {"name": "unetr", **{k: v for k, v in unetr_kwargs().items()}}
    save_backbone(unetr_src, cfg, tmp_path / "backbone")
    net, report = load_network(tmp_path / "backbone")
    assert report.complete and same_tensors(unetr_src.state_dict(), net.state_dict())


def test_errors_say_what_to_do(tmp_path, unetr_src):
    with pytest.raises(FileNotFoundError):
        load_network(tmp_path / "missing.pt", network=UNETR)
    path = _save(unetr_src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(NetworkLoadError, match="network="):
        load_network(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NetworkLoadError, match="not a network folder"):
        load_network(tmp_path / "empty")
    with pytest.raises(NetworkLoadError, match="no tensor of the checkpoint fits"):
        load_network(path, network="monai.networks.nets.ViT", in_channels=1, img_size=16, patch_size=16,
                     hidden_size=96, mlp_dim=192, num_layers=1, num_heads=4)
    net, report = load_network(path, network=SWIN, **swin_kwargs())  # a few tensors fit by chance
    assert any("right network" in n for n in report.notes)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(NetworkLoadError, match="not a state dict"):
        load_network(tmp_path / "list.pt", network=UNETR, **unetr_kwargs())


# ------------------------------------------------------------------------------------- partial loads (issue 21)
def test_checkpoint_of_another_unetr_size_warns_naming_the_largest_missing_modules(tmp_path, unetr_src):
    """A checkpoint of another UNETR size fills few of the network's tensors: load_network warns (a
    PartialLoadWarning, pointing at the caller's line) with the largest modules left as initialised, where a full
    checkpoint loads silently; strict=True still refuses, as before."""
    import warnings

    from peft_tensor.errors import PartialLoadWarning

    other = build(UNETR, {**unetr_kwargs(), "hidden_size": 48, "mlp_dim": 96}, seed=3)
    path = _save(other.state_dict(), tmp_path / "unetr_h48.safetensors")
    with pytest.warns(PartialLoadWarning) as caught:
        net, report = load_network(path, network=UNETR, **unetr_kwargs())
    assert len(caught) == 1 and caught[0].filename == __file__  # the user's call, not the library's internals
    message = str(caught[0].message)
    total = len(net.state_dict())
    assert f"only {len(report.loaded)} of {total} tensors of monai.networks.nets.UNETR" in message
    assert len(report.loaded) < 0.9 * total and report.partial
    # the whole ViT encoder is one entry (not its hundreds of tensors), first: it is the largest module left out
    vit = sum(v.numel() for k, v in net.state_dict().items() if k.startswith("vit."))
    assert report.largest_unloaded()[0] == ("vit", vit)
    assert "Largest modules not loaded: vit (" in message and "strict=True" in message
    with pytest.raises(NetworkLoadError, match="strict load failed"):
        load_network(path, network=UNETR, strict=True, **unetr_kwargs())

    full = _save(unetr_src.state_dict(), tmp_path / "unetr.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the load
        _, report = load_network(full, network=UNETR, **unetr_kwargs())
    assert report.complete and not report.partial


def test_recipes_load_backbone_passes_the_warning_on(tmp_path):
    """The recipes' ``model.pretrained`` (load_backbone) reaches the user with the same warning and prints the
    report, whose note says the same."""
    from peft_tensor.errors import PartialLoadWarning
    from peft_tensor.training.models import load_backbone

    from tests._recipe_fixtures import TINY_MODEL

    other = build(UNETR, {**unetr_kwargs(img=32), "hidden_size": 48, "mlp_dim": 96}, seed=3)
    path = _save(other.state_dict(), tmp_path / "other.pt")
    with pytest.warns(PartialLoadWarning, match=r"Largest modules not loaded: vit \("):
        load_backbone(str(path), TINY_MODEL)


def test_self_supervised_encoder_checkpoint_warns_only_for_the_encoder(tmp_path):
    """model_swinvit.pt holds the encoder only, by design: all of it loaded is no partial load (the decoder is not
    missing from that file); into a SwinUNETR v2, whose extra encoder blocks (layers1c..4c, over 10% of its encoder
    here) the file lacks, it warns naming those blocks."""
    import warnings

    src = build(SWIN, swin_kwargs(), seed=1)
    path = _save(_ssl_swinvit(src), tmp_path / "model_swinvit.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = load_network(path, network=SWIN, **swin_kwargs(out_channels=3))
    assert report.missing and not report.partial
    from peft_tensor.errors import PartialLoadWarning

    with pytest.warns(PartialLoadWarning, match=r"tensors of monai.networks.nets.SwinUNETR's encoder swinViT\.\*"):
        _, report = load_network(path, network=SWIN, **swin_kwargs(out_channels=3, use_v2=True))
    named = [name for name, _ in report.largest_unloaded()]
    assert named and all(re.fullmatch(r"swinViT\.layers[1-4]c", name) for name in named), named
