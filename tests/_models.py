"""Model builders for the test-suite: test-sized MONAI networks that keep the real module names, full-size ones
for parameter-count oracles, a small generic torch model and tiny transformers models built from configs."""

from __future__ import annotations

import torch
from torch import nn

UNETR_TARGETS = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]
# The papers train the decoder in every PEFT arm: decoder2-5 hold 2,678,528 parameters in UNETR-B.
UNETR_DECODER = ["decoder2", "decoder3", "decoder4", "decoder5"]
SWIN_TARGETS = ["attn.qkv", "attn.proj", "mlp.linear1", "mlp.linear2", "downsample.reduction"]


def tiny_unetr(seed: int = 0, img: int = 32, num_layers: int = 12):
    """UNETR(hidden 96, mlp 192, 4 heads, feature 8): same module names as UNETR-B, ~2 M parameters."""
    from monai.networks.nets import UNETR

    torch.manual_seed(seed)
    net = UNETR(
        in_channels=1, out_channels=2, img_size=(img, img, img), feature_size=8, hidden_size=96,
        mlp_dim=192, num_heads=4, proj_type="conv", norm_name="instance", dropout_rate=0.0,
    )
    if num_layers != 12:
        net.vit.blocks = net.vit.blocks[:num_layers]
    return net.eval()


def full_unetr(img: int = 128, seed: int = 0):
    from monai.networks.nets import UNETR

    torch.manual_seed(seed)
    return UNETR(
        in_channels=1, out_channels=2, img_size=(img, img, img), feature_size=16, hidden_size=768, mlp_dim=3072,
        num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.1,
    )


def tiny_swinunetr(seed: int = 0):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1)).eval()


def full_swinunetr(seed: int = 0):
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=2, feature_size=48)


class TinyMLP(nn.Module):
    """A generic model: three same-shape Linear layers (one group under by_shape grouping) plus a head."""

    def __init__(self, seed: int = 0, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, width)
        self.lin1 = nn.Linear(width, width)
        self.lin2 = nn.Linear(width, width)
        self.lin3 = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = torch.relu(self.lin0(x))
        x = torch.relu(self.lin1(x))
        x = torch.relu(self.lin2(x))
        x = torch.relu(self.lin3(x))
        return self.head(x)


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=16, patch_size=8, num_channels=1)
    return ViTModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32)
    return BertModel(cfg).eval()
