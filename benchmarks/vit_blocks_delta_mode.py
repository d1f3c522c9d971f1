"""delta_mode micro-benchmark on CUDA: UNETR-B's 12 ViT blocks, forward + backward + Adam step, per arm.

    python benchmarks/vit_blocks_delta_mode.py      # on a GPU; writes $OUT (or .)/vit_gpu.json

Arms: frozen floor, PEFT LoRA r=8, and tCURLoRA / LoRA-PT r=8 (paper and by_shape grouping) with
``delta_mode`` factored, dense and auto. Median of 10 timed steps after 3 warm-ups, true float32 (TF32 off).
Results of one H200 run: ``benchmarks/results/vit_blocks_delta_mode_gpu.json``. Its peak-memory column is not per
arm (earlier arms were not freed before the next one was measured): read only the times.
"""

import copy
import json
import os
import time

import torch
from monai.networks.nets import ViT
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_tensor import LoraPTConfig, TCURLoraConfig

TARGETS = ["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        vit = ViT(in_channels=1, img_size=(128, 128, 128), patch_size=(16, 16, 16), hidden_size=768, mlp_dim=3072,
                  num_layers=12, num_heads=12)
        self.blocks = vit.blocks

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def arms():
    out = {"floor": None, "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)}
    for grouping in ("paper", "by_shape"):
        for mode in ("factored", "dense", "auto"):
            for name, cls in (("tcurlora", TCURLoraConfig), ("lorapt", LoraPTConfig)):
                out[f"{name}-{grouping}-{mode}"] = (
                    lambda cls=cls, g=grouping, m=mode: cls(r=8, target_modules=TARGETS, grouping=g, delta_mode=m))
    return out


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    base, rows = Blocks(), []
    for tokens, batch in ((512, 1), (1024, 2)):
        res = {}
        for name, make in arms().items():
            model = copy.deepcopy(base).cuda()
            if make is None:
                model.requires_grad_(False)
            else:
                model = get_peft_model(model, make())
            x = torch.randn(batch, tokens, 768, device="cuda")
            params = [p for p in model.parameters() if p.requires_grad] or [x.new_zeros(1, requires_grad=True)]
            opt = torch.optim.Adam(params)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(13):
                xi = x.clone().requires_grad_(True)
                torch.cuda.synchronize()
                start = time.perf_counter()
                (model(xi).float() ** 2).mean().backward()
                opt.step()
                opt.zero_grad()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            res[name] = (sorted(times[3:])[5] * 1e3, torch.cuda.max_memory_allocated() / 2**20)
            del model, opt
            torch.cuda.empty_cache()
        for name, (ms, mem) in res.items():
            rows.append({"tokens": tokens, "batch": batch, "arm": name, "ms": ms, "x_floor": ms / res["floor"][0],
                         "x_lora": ms / res["lora"][0], "peak_MB": mem, "mem_x_lora": mem / res["lora"][1]})
            print(f"N={tokens} B={batch} {name:28s} {ms:8.2f} ms  x floor {ms / res['floor'][0]:.2f}  "
                  f"x LoRA {ms / res['lora'][0]:.2f}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "vit_gpu.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
