"""The model card templates (Jinja, rendered by huggingface_hub's ``ModelCard.from_template``).

This folder is the repository's top-level ``model_cards/``; the wheel ships it as the ``peft_tensor.model_cards``
package (a setuptools ``package-dir`` mapping, like ``recipes/``). ``peft_tensor.hub.cards`` reads the templates with
``importlib.resources`` and holds the logic that fills them:

- ``adapter_card.md``: the card of an adapter repository (``build_adapter_card``);
- ``base_weights_card.md``: the card of a base-weights repository (``build_base_weights_card``).
"""
