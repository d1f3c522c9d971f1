"""Conditioning of the tensor methods' factors on a backbone (issue 22): why tCURLoRA's and LoRA-PT's adapters learn
slowly on some backbones.

For one pretrained backbone and one arm (the adapter alone, ``decoder: head``, as in ``finetune_cpu``) it prints, per
group tensor:

* ``kC``, ``kR`` (tCURLoRA): the largest condition number over the Fourier slices of the selected columns ``C`` and
  rows ``R``; ``kU0``: of the intersection's pseudo-inverse ``U0``; (LoRA-PT) ``s1/sr``: the spread of the principal
  tubal singular values;
* ``gain`` (tCURLoRA): how far a unit step on one core entry moves the weights (``|dW|_F``), min / max over the core's
  entries -- the spread of the effective per-parameter step an optimiser that moves every entry by ``lr`` (Adam) sees;
  ``dir``: the same for the best / worst *direction* of the core (``sigma(C) sigma(R)``, its condition number);
* ``|g|``: the gradient norm of each trainable factor at init (first batch) and ``wd/g``: the ratio of the weight
  decay term ``weight_decay * |p|`` Adam adds to that gradient (coupled L2) to it: above 1 the optimiser follows the
  weight decay, not the data;
* after ``steps`` Adam steps at the method's learning rate: ``|dW|/|W|``, the relative change of the adapted weights
  and (tCURLoRA, ``basis='paper'``) the cosine between that change and ``-P = -s C U0 R``, the direction weight decay
  pulls the paper's core in: near 1 the adapter is removing the weights' CUR part rather than learning.

    python benchmarks/conditioning.py model.pretrained=runs/pre/backbone arm.name=tcurlora steps=20
    python benchmarks/conditioning.py model.pretrained=runs/pre/backbone arm.name=lorapt arm.factor_scale=1.0

Any ``finetune_cpu`` key can be overridden (``arm.*``, ``optim.*``); ``steps`` (default 20) is the number of
training steps measured.

``timing=N`` instead times tCURLoRA r=8 on UNETR-B (64^3, batch 1, paper grouping, one thread) in both core bases,
alternated ``N`` times: set-up (``get_peft_model``) and one training step (forward + backward), medians::

    python benchmarks/conditioning.py timing=5
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the checkout's root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peft_tensor.algebra import fourier_slice_weights, from_fourier, to_fourier  # noqa: E402
from peft_tensor.training.config import load_config  # noqa: E402


def _cond(m_hat: torch.Tensor) -> float:
    """Largest condition number over the Fourier slices of ``m_hat`` ``(F, a, b)``."""
    s = torch.linalg.svdvals(m_hat)
    return float((s[..., 0] / s[..., -1].clamp_min(1e-30)).max())


def tcur_rows(group) -> dict:
    c, r = group.cols.double(), group.rows.double()
    c_hat, r_hat = to_fourier(c), to_fourier(r)
    row = {"kC": _cond(c_hat), "kR": _cond(r_hat)}
    if group.basis == "orthonormal":  # the factors the core multiplies: C * Wc and Wr * R
        c_hat = c_hat @ to_fourier(group.col_whiten.double())
        r_hat = to_fourier(group.row_whiten.double()) @ r_hat
    else:
        row["kU0"] = _cond(to_fourier(group.tcurlora_core_init.double()))
    w = fourier_slice_weights(group.n_slices, dtype=torch.float64)
    s = group.scale()
    # unit step on U[l, i, j]: |s C * E_lij * R|_F^2 = s^2 / L sum_f w_f |C_f[:, i]|^2 |R_f[j, :]|^2 (independent of l)
    cn = c_hat.abs().square().sum(-2)  # (F, r)
    rn = r_hat.abs().square().sum(-1)  # (F, r)
    gain = (s * ((w[:, None, None] * cn[:, :, None] * rn[:, None, :]).sum(0) / group.n_slices).sqrt())
    sc, sr = torch.linalg.svdvals(c_hat), torch.linalg.svdvals(r_hat)
    dirs = s * sc[:, :, None] * sr[:, None, :] / group.n_slices ** 0.5
    return {**row, "gain_min": float(gain.min()), "gain_max": float(gain.max()),
            "dir_min": float(dirs.min()), "dir_max": float(dirs.max())}


def lorapt_rows(group) -> dict:
    core = group.lorapt_S_init.double()
    core = torch.diag_embed(core) if group.diagonal else core
    sv = torch.linalg.svdvals(to_fourier(core))
    return {"s1/sr": float((sv[..., 0] / sv[..., -1].clamp_min(1e-30)).max()), "s1": float(sv[..., 0].max()),
            "scale": group.scales()[0]}


def timing(repeats: int) -> None:
    import copy
    import statistics
    import time

    from monai.networks.nets import UNETR
    from peft import get_peft_model

    from peft_tensor import TCURLoraConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = UNETR(in_channels=1, out_channels=2, img_size=(64, 64, 64), feature_size=16, hidden_size=768,
                 mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance", dropout_rate=0.0)
    x = torch.randn(1, 1, 64, 64, 64)
    times = {b: {"setup": [], "step": []} for b in ("paper", "orthonormal")}
    for _ in range(repeats):
        for basis in times:
            net = copy.deepcopy(base)
            t0 = time.perf_counter()
            model = get_peft_model(net, TCURLoraConfig(
                r=8, grouping="paper", basis=basis,
                target_modules=["attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2"]))
            times[basis]["setup"].append(time.perf_counter() - t0)
            model.train()
            model(x).square().mean().backward()  # warm-up (caches)
            t0 = time.perf_counter()
            model(x).square().mean().backward()
            times[basis]["step"].append(time.perf_counter() - t0)
    print(f"tCURLoRA r=8, UNETR-B 64^3, batch 1, paper grouping, 1 thread, {repeats} alternated repeats (median s)")
    print("| basis | setup s | step s |\n|---|---:|---:|")
    for basis, t in times.items():
        print(f"| {basis} | {statistics.median(t['setup']):.3f} | {statistics.median(t['step']):.3f} |")


def main(argv: list[str]) -> None:
    steps = 20
    rest = []
    for a in argv:
        if a.startswith("steps="):
            steps = int(a.split("=", 1)[1])
        elif a.startswith("timing="):
            return timing(int(a.split("=", 1)[1]))
        else:
            rest.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("finetune_cpu", ["threads=1", "progress=false", "data.progress=false", "arm.decoder=head",
                                           f"output_dir={tmp}", *rest], schema="finetune")
        run(cfg, steps)


def run(cfg: dict, steps: int) -> None:
    from peft_tensor.data import train_loader
    from peft_tensor.data.transforms import augmentation
    from peft_tensor.training import apply_arm, load_backbone, model_config_for_task, set_seed
    from peft_tensor.training.arms import optimizer_settings
    from peft_tensor.training.loop import make_loss, make_optimizer, start_run, step_seed
    from peft_tensor.training.schema import OptimConfig, fill_block

    rs = start_run(cfg)
    model_cfg = model_config_for_task(cfg["model"], rs.task)
    model = load_backbone(model_cfg["pretrained"], model_cfg)[0]
    set_seed(rs.seed)
    model = apply_arm(model, cfg["arm"], model_cfg)
    method = cfg["arm"]["name"]
    tuner = model.base_model
    groups = list(getattr(tuner, f"{tuner.prefix}groups")["default"])
    optim_cfg = fill_block(OptimConfig, {**cfg["optim"], **optimizer_settings(cfg["arm"])}, "optim")
    wd = float(optim_cfg["weight_decay"])
    print(f"backbone {model_cfg['pretrained']}  arm {dict(cfg['arm'])}  method lr {optim_cfg['method_lr']}  "
          f"weight decay {wd}  steps {steps}")

    rows = {}
    with torch.no_grad():
        w0 = {g.name: g.stacked_weight().double() for g in groups}
        for g in groups:
            rows[g.name] = {"shape": f"{g.n_slices}x{g.n1}x{g.n2}"}
            rows[g.name].update(tcur_rows(g) if method == "tcurlora" else lorapt_rows(g))

    train_cases = rs.sources.get("train", [])
    aug = augmentation(rs.patch, float(cfg["train"]["crop_pos"]), float(cfg["train"]["crop_neg"]),
                       cfg["train"]["crop"])
    batches = iter(train_loader(train_cases, rs.seed, int(cfg["train"]["batch_size"]), aug, 0, steps, 0, 1,
                                rs.loader_cfg, rs.dist.device, rs.task.softmax))
    loss_fn = make_loss(cfg["train"]["loss"], rs.task)
    optimizer = make_optimizer(model, optim_cfg)
    params = {g.name: [(n, p) for n, p in g.named_parameters(recurse=False) if p.requires_grad] for g in groups}
    first = {}
    losses = []
    for step in range(steps):
        step_seed(rs.seed, step)
        images, labels = next(batches)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images).float(), labels)
        loss.backward()
        losses.append(float(loss.detach()))
        for k, ps in params.items():
            for n, p in ps:
                gn = float(p.grad.norm()) if p.grad is not None else 0.0
                if step == 0:
                    first[(k, n)] = (gn, wd * float(p.detach().norm()))
        optimizer.step()

    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    with torch.no_grad():
        for g in groups:
            row = rows[g.name]
            d = g.dense_delta().double()
            w = w0[g.name]
            row["dW/W"] = float(d.norm() / w.norm())
            if method == "tcurlora" and g.basis == "paper":  # the part C * U0 * R of W the core spans at init
                p = from_fourier(to_fourier(g.cols.double()) @ to_fourier(g.tcurlora_core_init.double())
                                 @ to_fourier(g.rows.double()), g.n_slices)
                row["cos(dW,-P)"] = float((d * -p).sum() / (d.norm() * p.norm()).clamp_min(1e-30))
            for n, _ in params[g.name]:
                gn, wdn = first[(g.name, n)]
                row[f"|g| {n.split('_', 1)[1]}"] = gn
                row[f"wd/g {n.split('_', 1)[1]}"] = wdn / max(gn, 1e-30)

    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print("| group | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        cells = [row.get(k, "") for k in keys]
        print(f"| {name} | " + " | ".join(c if isinstance(c, str) else f"{c:.3g}" for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
