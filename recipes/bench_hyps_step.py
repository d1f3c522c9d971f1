"""One training step of SwinUNETR-48 at 64^3: HyPS (r=2, d=2) versus PEFT's LoRA (r=8) on the same targets.

Both arms adapt the paper's target set (every Linear of the Swin encoder: attn.qkv, attn.proj, mlp.linear1,
mlp.linear2, downsample.reduction) and train the decoder and head in full, as in the HyPS paper. A step is
forward + soft Dice loss + backward + Adam update, batch 1, one 64^3 volume. Reported: the median of the timed steps
after warm-up, all arms in one process (steps interleaved round-robin), on the same base weights and data.

Run from the repository root with the package installed (`pip install -e .`, or `PYTHONPATH=.`):

    python recipes/bench_hyps_step.py                 # 2 threads, 1 warm-up + 3 timed steps per arm
    python recipes/bench_hyps_step.py --threads 1 --steps 5 --arms hyps lora decoder

Timings depend heavily on what else runs on the machine: compare arms from the same run only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from monai.losses import DiceLoss
from monai.networks.nets import SwinUNETR
from peft import LoraConfig, get_peft_model

from peft_tensor.tuners.hyps import SWINUNETR_HYPS_TARGETS, HyPSConfig

DECODER = ["decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out.conv.conv"]

ARMS = {
    "hyps": ("HyPS r=2 d=2 + decoder", lambda: HyPSConfig(r=2, d=2, target_modules=SWINUNETR_HYPS_TARGETS,
                                                           modules_to_save=DECODER)),
    "hyps-parallel": ("HyPS r=2 parallel only + decoder",
                      lambda: HyPSConfig(r=2, serial=False, target_modules=SWINUNETR_HYPS_TARGETS,
                                         modules_to_save=DECODER)),
    "lora": ("PEFT LoRA r=8 + decoder", lambda: LoraConfig(r=8, lora_alpha=8, target_modules=SWINUNETR_HYPS_TARGETS,
                                                          modules_to_save=DECODER)),
    "decoder": ("decoder only (no adapter)", None),
}


def build_model(arm: str, base: torch.nn.Module) -> torch.nn.Module:
    make_config = ARMS[arm][1]
    model = copy.deepcopy(base)
    if make_config is None:
        for name, p in model.named_parameters():
            p.requires_grad = name.split(".")[0] in {"decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"}
        return model
    return get_peft_model(model, make_config())


def make_step(model: torch.nn.Module, x: torch.Tensor, label: torch.Tensor):
    """A closure running one training step (the papers' optimiser: Adam with amsgrad, lr 1e-3, wd 2e-5)."""
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=2e-5,
                           amsgrad=True)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), label)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="cubic input side (multiple of 32, >= 64)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["hyps", "lora"], choices=list(ARMS))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, args.size, args.size, args.size, generator=g)
    label = (torch.rand(1, 1, args.size, args.size, args.size, generator=g) > 0.9).float()

    steps, setups, trainables = {}, {}, {}
    for arm in args.arms:
        start = time.perf_counter()
        model = build_model(arm, base)
        setups[arm] = time.perf_counter() - start
        trainables[arm] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps[arm] = make_step(model, x, label)
    # Round-robin: step i of every arm runs before step i+1 of any, so drifting machine load hits all arms alike.
    times = {arm: [] for arm in args.arms}
    for i in range(args.warmup + args.steps):
        for arm in args.arms:
            t = steps[arm]()
            if i >= args.warmup:
                times[arm].append(t)
    rows = [(ARMS[arm][0], trainables[arm], setups[arm], statistics.median(times[arm]), min(times[arm]),
             max(times[arm])) for arm in args.arms]

    print(f"SwinUNETR-48, one training step at {args.size}^3, batch 1, CPU, {args.threads} thread(s), torch "
          f"{torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up, arms interleaved")
    header = f"{'arm':34} {'trainable':>12} {'setup s':>8} {'median s':>9} {'min s':>7} {'max s':>7}"
    print(header)
    print("-" * len(header))
    for name, trainable, setup, med, lo, hi in rows:
        print(f"{name:34} {trainable:>12,} {setup:>8.2f} {med:>9.2f} {lo:>7.2f} {hi:>7.2f}")


if __name__ == "__main__":
    main()
