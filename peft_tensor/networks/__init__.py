"""Networks in and out: pretrained weights from bundles, checkpoints and Hub repos (:func:`load_network`), networks
by dotted class path with target presets (:mod:`.specs`), and the merged network exported as a MONAI bundle
(:func:`export_bundle`). Library code: imports neither the recipes nor the training code."""

from .bundle import BundleExportError, export_bundle
from .load import LoadReport, NetworkLoadError, load_network, load_state
from .specs import NETWORK_ALIASES, NetworkSpecError, Preset, build_from_spec, preset_for, split_spec, spec_of

__all__ = ["BundleExportError", "LoadReport", "NETWORK_ALIASES", "NetworkLoadError", "NetworkSpecError", "Preset",
           "build_from_spec", "export_bundle", "load_network", "load_state", "preset_for", "spec_of", "split_spec"]
