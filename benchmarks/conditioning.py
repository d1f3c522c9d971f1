"""Conditioning of the tensor methods' factors on a backbone (issue 22): why tCURLoRA's and LoRA-PT's adapters learn
slowly on some backbones.

For one pretrained backbone and one arm (the adapter alone, ``decoder: head``, as in ``finetune_cpu``) it prints, per
group tensor:

* ``kC``, ``kR`` (tCURLoRA): the largest condition number over the Fourier slices of the selected columns ``C`` and
  rows ``R``; ``kU0``: of the intersection's pseudo-inverse ``U0``; (LoRA-PT) ``s1/sr``: the spread of the principal
  tubal singular values (largest over the Fourier slices); ``si/s1 med``, ``sr/s1``: per component (column of ``U``
  and ``V``) its largest Fourier-slice singular value over ``sigma_1``, the median and the last (``r``-th) component:
  with ``factor_scale='auto'`` a step on that column moves the weights this fraction of a step on the principal
  column (``'per_component'``: all alike); ``scale``: the factors' scale (its largest per component);
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

``capture=N`` instead measures, per group tensor, how much of the task's weight gradient at init (averaged over
``N`` batches) each adapter's update space can follow: the fraction ``|P(G)|^2 / |G|^2`` of the gradient ``G`` of the
loss w.r.t. the stacked base weights that lies in the space of updates the adapter's trainable factors span at init
(its tangent space; the first-order loss decrease of a step of given size is proportional to ``|P(G)|``). Columns:
tCURLoRA's core at each rank of ``ranks`` (``C * X * R``: the selected columns' span x the selected rows' span, per
Fourier slice), the same with random columns/rows (``rand``, mean of 3 draws), the best two-sided subspaces of that
size for this very gradient (``best``, the sum of its top ``r`` squared singular values per Fourier slice: no
choice of columns/rows does better), PEFT LoRA r=8 at init (``B`` trains: the rows of ``A``, Kaiming-uniform per
layer) and LoRA-PT's principal factors (tubal rank ``lorapt_r``: ``U X + Y V^T`` per Fourier slice)::

    python benchmarks/conditioning.py model.pretrained=runs/pre/backbone capture=4 data.task=target_shift
    python benchmarks/conditioning.py model.pretrained=runs/pre/backbone capture=4 steps=150 arm.r=16

With ``steps=N`` the gradient is taken after ``N`` steps of the tCURLoRA arm (its recipe rate): has the task's
gradient left the spaces the core can move in?

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
    # per component (column of U and V) its largest Fourier-slice singular value over sigma_1: under
    # factor_scale='auto' a unit step on that column moves the weights this fraction of a step on the principal one
    comp = sv.amax(0) / sv.max().clamp_min(1e-30)
    return {"s1/sr": float((sv[..., 0] / sv[..., -1].clamp_min(1e-30)).max()), "s1": float(sv[..., 0].max()),
            "si/s1 med": float(comp.median()), "sr/s1": float(comp[-1]), "scale": _largest(group.scales()[0])}


def _largest(scale) -> float:
    """A LoRA-PT factor scale as one number: the largest per-component scale of ``factor_scale='per_component'``."""
    return float(scale.max()) if isinstance(scale, torch.Tensor) else float(scale)


def _tangent_fractions(w: torch.Tensor, g: torch.Tensor, ranks, lorapt_r: int, gen: torch.Generator) -> dict:
    """Fractions of ``|g|^2`` (``g``, ``w``: ``(L, n1, n2)`` float64) in each adapter's tangent space at init."""
    from peft_tensor.algebra import tensor_cur

    n_slices, n1, n2 = w.shape
    fw = fourier_slice_weights(n_slices, dtype=torch.float64)
    g_hat, w_hat = to_fourier(g), to_fourier(w)
    total = float((fw * g_hat.abs().square().sum((-2, -1))).sum())

    def two_sided(c_hat, r_hat):  # |Q_C Q_C^H G Q_R Q_R^H|^2 / |G|^2, per Fourier slice
        qc = torch.linalg.qr(c_hat).Q
        qr = torch.linalg.qr(r_hat.transpose(-1, -2).conj()).Q
        p = qc.transpose(-1, -2).conj() @ g_hat @ qr
        return float((fw * p.abs().square().sum((-2, -1))).sum()) / total

    out = {}
    sv = torch.linalg.svdvals(g_hat)
    for r in ranks:
        cur = tensor_cur(w, r)
        out[f"tcur r={r}"] = two_sided(to_fourier(cur.C), to_fourier(cur.R))
        rand = []
        for _ in range(3):
            ci = torch.randperm(n2, generator=gen)[:r]
            ri = torch.randperm(n1, generator=gen)[:r]
            rand.append(two_sided(w_hat[..., ci], w_hat[..., ri, :]))
        out[f"rand r={r}"] = sum(rand) / len(rand)
        out[f"best r={r}"] = float((fw * sv[..., :r].square().sum(-1)).sum()) / total
    # PEFT LoRA r=8 at init: dW = dB A, the gradient's projection on the row space of A (per layer)
    bound = (6.0 / n2) ** 0.5 / 5 ** 0.5  # kaiming_uniform_(a=sqrt(5)) bound; the span does not depend on it
    a = (torch.rand(n_slices, 8, n2, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    qa = torch.linalg.qr(a.transpose(-1, -2)).Q  # (L, n2, 8)
    out["lora r=8"] = float((g @ qa).square().sum()) / float(g.square().sum())
    # LoRA-PT at init: dW = dU S V^T + U dS V^T + U S dV^T: per Fourier slice, P_U G + G P_V - P_U G P_V
    u, _, vh = torch.linalg.svd(w_hat, full_matrices=False)
    u, v = u[..., :lorapt_r], vh[..., :lorapt_r, :].transpose(-1, -2).conj()
    pu = u.transpose(-1, -2).conj() @ g_hat
    gv = g_hat @ v
    both = u.transpose(-1, -2).conj() @ g_hat @ v
    e = pu.abs().square().sum((-2, -1)) + gv.abs().square().sum((-2, -1)) - both.abs().square().sum((-2, -1))
    out[f"lorapt r={lorapt_r}"] = float((fw * e).sum()) / total
    return out


def _first_step_cosines(w: torch.Tensor, g: torch.Tensor, r: int, gen: torch.Generator) -> dict:
    """cos(dW, -G) of the weight change of Adam's first step (``-lr sign(grad)`` on every trainable entry), per
    parametrisation: how much of a step's length descends (1: the steepest descent in the whole weight space)."""
    from peft_tensor.algebra import t_qr_whiteners, tensor_cur

    n_slices, n1, n2 = w.shape
    cur = tensor_cur(w, r)
    c_hat, r_hat = to_fourier(cur.C), to_fourier(cur.R)
    wc, wr = t_qr_whiteners(cur.C, cur.R)
    qc_hat, qr_hat = c_hat @ to_fourier(wc.double()), to_fourier(wr.double()) @ r_hat

    def cos_of(delta_fn, shape):
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        (delta_fn(x) * g).sum().backward()
        with torch.no_grad():
            d = delta_fn(-x.grad.sign())
        return float((d * -g).sum() / (d.norm() * g.norm()).clamp_min(1e-300))

    def hartley(x):
        f = torch.fft.fft(x, dim=0)
        return (f.real - f.imag) / n_slices ** 0.5

    out = {
        f"tcur paper r={r}": cos_of(lambda x: from_fourier(c_hat @ to_fourier(x) @ r_hat, n_slices), (n_slices, r, r)),
        f"tcur orthonormal r={r}": cos_of(lambda x: from_fourier(qc_hat @ to_fourier(x) @ qr_hat, n_slices),
                                          (n_slices, r, r)),
        f"tcur fourier r={r}": cos_of(lambda x: from_fourier(c_hat @ to_fourier(hartley(x)) @ r_hat, n_slices),
                                      (n_slices, r, r)),
    }
    bound = (6.0 / n2) ** 0.5 / 5 ** 0.5
    a = (torch.rand(n_slices, 8, n2, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    out["lora r=8 (dB)"] = cos_of(lambda x: x @ a, (n_slices, n1, 8))
    return out


class _Setup:
    """What both measurements start from: the run (``start_run``), the backbone with ``arm`` applied (the adapter
    alone, as ``finetune_cpu`` builds it), its group tensors, the loss, the optimiser settings of the arm, and
    ``batches(seed, n)``, the recipe's training batches."""

    def __init__(self, cfg: dict, arm: dict):
        from peft_tensor.data import train_loader
        from peft_tensor.data.transforms import augmentation
        from peft_tensor.training import apply_arm, load_backbone, model_config_for_task, set_seed
        from peft_tensor.training.arms import optimizer_settings
        from peft_tensor.training.loop import make_loss, start_run
        from peft_tensor.training.schema import OptimConfig, fill_block

        self.rs = rs = start_run(cfg)
        self.model_cfg = model_config_for_task(cfg["model"], rs.task)
        model = load_backbone(self.model_cfg["pretrained"], self.model_cfg)[0]
        set_seed(rs.seed)
        self.model = apply_arm(model, arm, self.model_cfg)
        tuner = self.model.base_model
        self.groups = list(getattr(tuner, f"{tuner.prefix}groups")["default"])
        self.loss_fn = make_loss(cfg["train"]["loss"], rs.task)
        self.optim_cfg = fill_block(OptimConfig, {**cfg["optim"], **optimizer_settings(arm)}, "optim")
        aug = augmentation(rs.patch, float(cfg["train"]["crop_pos"]), float(cfg["train"]["crop_neg"]),
                           cfg["train"]["crop"])
        batch_size = int(cfg["train"]["batch_size"])
        self.batches = lambda seed, n: iter(train_loader(rs.sources.get("train", []), seed, batch_size, aug, 0, n, 0,
                                                         1, rs.loader_cfg, rs.dist.device, rs.task.softmax))


def _print_table(rows: dict, keys: list, fmt: str = "{:.3f}") -> None:
    print("| group | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        cells = [row.get(k, "") for k in keys]
        print(f"| {name} | " + " | ".join(c if isinstance(c, str) else fmt.format(c) for c in cells) + " |")


def capture(cfg: dict, n_batches: int, train_steps: int = 0, ranks=(8, 16, 32), lorapt_r: int = 32) -> None:
    """Print the gradient fractions of :func:`_tangent_fractions` per group tensor (see the module docstring), at
    init or, with ``train_steps``, after that many steps of the tCURLoRA arm (``arm.*``; the adapter alone) at its
    method rate: the gradient of the adapted network then, in the same (fixed) spaces."""
    from peft_tensor.training.loop import make_optimizer, step_seed

    arm = {**cfg["arm"], "name": "tcurlora"}
    setup = _Setup(cfg, arm)  # the groups (identity at init)
    rs, model, groups, loss_fn = setup.rs, setup.model, setup.groups, setup.loss_fn
    model.train()
    if train_steps:
        optimizer = make_optimizer(model, setup.optim_cfg)
        batches = setup.batches(rs.seed, train_steps)
        for step in range(train_steps):
            step_seed(rs.seed, step)
            images, labels = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images).float(), labels).backward()
            optimizer.step()
    weights = {id(layer.get_base_layer().weight): layer.get_base_layer().weight
               for g in groups for layer, _, _ in g._sources}
    for w in weights.values():
        w.requires_grad_(True)
    batches = setup.batches(rs.seed + 1, n_batches)
    for step in range(n_batches):
        step_seed(rs.seed + 1, step)
        images, labels = next(batches)
        (loss_fn(model(images).float(), labels) / n_batches).backward()
    gen = torch.Generator().manual_seed(0)
    rows, tot_g, cos_rows = {}, {}, {}
    for g in groups:
        w = g.stacked_weight(torch.float64)
        grad = torch.stack([layer.get_base_layer().weight.grad[r0:r1].double() for layer, r0, r1 in g._sources])
        rows[g.name] = _tangent_fractions(w, grad, ranks, lorapt_r, gen)
        for r in ranks[:2]:
            cos_rows.setdefault(g.name, {}).update(_first_step_cosines(w, grad, r, gen))
        tot_g[g.name] = float(grad.square().sum())
    keys = list(next(iter(rows.values())))
    total = sum(tot_g.values())
    rows["all groups (|G|^2-weighted)"] = {k: sum(rows[n][k] * tot_g[n] for n in tot_g) / total for k in keys}
    when = f"after {train_steps} steps of {arm}" if train_steps else "at init"
    print(f"backbone {setup.model_cfg['pretrained']}  task {cfg['data']['task']}  {n_batches} batches: fraction of "
          f"the weight gradient in each adapter's update space at init, gradient {when}")
    _print_table(rows, keys)
    print("\ncos(dW, -G) of Adam's first step (every trainable entry moves by lr against its gradient's sign):")
    _print_table(cos_rows, list(next(iter(cos_rows.values()))))


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
    n_capture = 0
    rest = []
    for a in argv:
        if a.startswith("steps="):
            steps = int(a.split("=", 1)[1])
        elif a.startswith("timing="):
            return timing(int(a.split("=", 1)[1]))
        elif a.startswith("capture="):
            n_capture = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("finetune_cpu", ["threads=1", "progress=false", "data.progress=false", "arm.decoder=head",
                                           f"output_dir={tmp}", *rest], schema="finetune")
        if n_capture:
            return capture(cfg, n_capture, steps if "steps=" in " ".join(argv) else 0)
        run(cfg, steps)


def run(cfg: dict, steps: int) -> None:
    from peft_tensor.training.loop import make_optimizer, step_seed

    setup = _Setup(cfg, cfg["arm"])
    rs, model, groups, loss_fn, optim_cfg = setup.rs, setup.model, setup.groups, setup.loss_fn, setup.optim_cfg
    method = cfg["arm"]["name"]
    wd = float(optim_cfg["weight_decay"])
    print(f"backbone {setup.model_cfg['pretrained']}  arm {dict(cfg['arm'])}  method lr {optim_cfg['method_lr']}  "
          f"weight decay {wd}  steps {steps}")

    rows = {}
    with torch.no_grad():
        w0 = {g.name: g.stacked_weight().double() for g in groups}
        for g in groups:
            rows[g.name] = {"shape": f"{g.n_slices}x{g.n1}x{g.n2}"}
            rows[g.name].update(tcur_rows(g) if method == "tcurlora" else lorapt_rows(g))

    batches = setup.batches(rs.seed, steps)
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

    _print_table(rows, list(dict.fromkeys(k for r in rows.values() for k in r)), "{:.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
