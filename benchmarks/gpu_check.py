"""GPU check: every system runs on CUDA with the device following the model, and gives the CPU's result.

    python benchmarks/gpu_check.py            # needs a CUDA device; prints PASS/FAIL per check and GPU timings

Not part of the test suite (CI has no GPU). Each check runs the same call on CPU and on CUDA in float64 where
the comparison must be exact, and prints the largest difference; timings are medians on the GPU.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import manifex  # noqa: E402
from manifex.models import VAE, LeNet, SmallResNet  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


ONLY = [w for w in os.environ.get("MANIFEX_CHECKS", "").split(",") if w]  # e.g. MANIFEX_CHECKS=nmf,spectrum


def check(name):
    def wrap(fn):
        if ONLY and not any(w in name for w in ONLY):
            return fn
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as e:  # report and go on: one broken check must not hide the others
            ok, detail = False, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        RESULTS.append((name, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return fn
    return wrap


def gpu_time(fn, repeat=5):
    fn()
    SYNC()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        SYNC()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def maxdiff(a, b):
    if isinstance(a, (list, tuple)):
        return max(maxdiff(u, v) for u, v in zip(a, b))
    return float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max())


# MANIFEX_CHECK_DEVICE=cpu dry-runs the script on a machine without a GPU (the comparisons are then trivial).
cuda = torch.device(os.environ.get("MANIFEX_CHECK_DEVICE", "cuda"))
SYNC = torch.cuda.synchronize if cuda.type == "cuda" else (lambda: None)
torch.manual_seed(0)
lenet = LeNet((1, 32, 32), 10).double().eval()
x = torch.rand(8, 1, 32, 32, dtype=torch.float64)
y = torch.arange(8) % 10


@check("explain: 8 methods, CUDA = CPU (float64)")
def _():
    worst = {}
    for m in ["gradient", "input_x_gradient", "integrated_gradients", "saliency", "guided_backprop", "gradcam",
              "lrp_epsilon_gamma_box", "deeplift"]:
        e_cpu = manifex.explain(lenet, x, y, method=m)
        e_gpu = manifex.explain(lenet.to(cuda), x.to(cuda), y.to(cuda), method=m)
        assert e_gpu.device.type == cuda.type
        lenet.cpu()
        worst[m] = maxdiff(e_cpu, e_gpu) / max(float(e_cpu.abs().max()), 1e-30)
    w = max(worst.values())
    return w < 1e-8, f"worst relative difference {w:.1e} ({max(worst, key=worst.get)})"


@check("tangent_space: CUDA = CPU subspaces; GPU cost vs k forward passes at 32x32 and 256x256")
def _():
    vae = VAE((1, 32, 32), 10).double().eval()
    z = torch.randn(16, 10, dtype=torch.float64)
    T_cpu = manifex.tangent_space(vae.decode, z)
    T_gpu = manifex.tangent_space(vae.to(cuda).decode, z.to(cuda))
    P_cpu = torch.einsum("nkd,nke->nde", T_cpu.basis.flatten(2), T_cpu.basis.flatten(2))
    P_gpu = torch.einsum("nkd,nke->nde", T_gpu.basis.flatten(2).cpu(), T_gpu.basis.flatten(2).cpu())
    diff = float((P_cpu - P_gpu).abs().max())
    from manifex.alignment import upsampled_decoder
    vae32 = VAE((1, 32, 32), 10).eval().to(cuda)
    lines = []
    for size, dec in [(32, vae32.decode), (256, upsampled_decoder(vae32.decode, 256))]:
        zz = torch.randn(64, 10, device=cuda)
        t_tan = gpu_time(lambda: manifex.tangent_space(dec, zz))
        t_fwd = gpu_time(lambda: [dec(zz) for _ in range(10)])
        lines.append(f"{size}²: tangent {t_tan * 1e3:.1f} ms, 10 forwards {t_fwd * 1e3:.1f} ms ({t_tan / t_fwd:.1f}×)")
    return diff < 1e-8, f"projector difference {diff:.1e}; " + "; ".join(lines)


@check("manipulate: runs on CUDA with β-growth, x_adv on CUDA, finite")
def _():
    m = LeNet((1, 32, 32), 10).eval().to(cuda)
    xs = torch.rand(4, 1, 32, 32, device=cuda)
    target_map = torch.rand(4, 1, 32, 32, device=cuda)
    res = manifex.manipulate(m, "gradient", xs, target_map, iterations=20, beta_growth=(10, 100))
    xa = res.x_adv
    return xa.device.type == cuda.type and bool(torch.isfinite(xa).all()), f"x_adv on {xa.device}"


@check("counterfactual: CUDA = CPU (float64, VAE latent and pixel), same step counts")
def _():
    vae = VAE((1, 32, 32), 6).double().eval()
    clf = LeNet((1, 32, 32), 10).double().eval()
    xs = vae.decode(torch.randn(6, 6, dtype=torch.float64)).detach()
    out = []
    for space in ["latent", "pixel"]:
        kw = dict(generator=vae, space=space, max_steps=40, stop_prob=0.9)
        r_cpu = manifex.counterfactual(clf, xs, 3, **kw)
        kw["generator"] = vae.to(cuda)
        r_gpu = manifex.counterfactual(clf.to(cuda), xs.to(cuda), 3, **kw)
        vae.cpu(), clf.cpu()
        d = maxdiff(r_cpu.x_cf, r_gpu.x_cf)
        same = bool((r_cpu.steps.cpu() == r_gpu.steps.cpu()).all())
        out.append((space, d, same))
    ok = all(d < 1e-6 and s for _, d, s in out)
    return ok, "; ".join(f"{s}: max |Δx′| {d:.1e}, same steps {t}" for s, d, t in out)


@check("counterfactual speed on GPU: batch 64 vs 64 batch-1 runs (image flow, 100 steps)")
def _():
    from manifex.models.flows import ImageFlow
    flow = ImageFlow((1, 32, 32)).eval().to(cuda)
    clf = LeNet((1, 32, 32), 10).eval().to(cuda)
    n = 64 if cuda.type == "cuda" else 4
    xs = torch.rand(n, 1, 32, 32, device=cuda) * 0.9 + 0.05
    kw = dict(generator=flow, max_steps=100, stop_prob=0.999999, lr=5e-2)
    import warnings
    warnings.simplefilter("ignore")
    t_b = gpu_time(lambda: manifex.counterfactual(clf, xs, 3, batch_size=n, **kw), repeat=1)
    t_1 = gpu_time(lambda: [manifex.counterfactual(clf, xs[i:i + 1], 3, batch_size=1, **kw) for i in range(4)], repeat=1) * n / 4
    return True, f"batch {n}: {t_b:.2f} s, {n} × batch 1 (4 timed): {t_1:.2f} s, ratio {t_1 / t_b:.1f}×"


@check("counterfactual float32 on CUDA: exact flow stays exact (TF32 off for the call, flags restored)")
def _():
    import warnings

    from manifex.data import load_mnist5k
    from manifex.models.flows import ImageFlow
    from manifex.models.generators import ApproximateGeneratorWarning
    torch.manual_seed(0)
    xs = load_mnist5k().x[:64].to(cuda)  # at batch 16 cuDNN picked non-TF32 kernels on an H100
    flow = ImageFlow((1, 32, 32)).to(cuda)
    flow.initialize(xs)
    flow.eval()
    clf = LeNet((1, 32, 32), 10).eval().to(cuda)
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN convolutions
    with torch.no_grad():
        tf32_err = float((flow.decode(flow.encode(xs)) - xs).abs().max())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ApproximateGeneratorWarning)
        r = manifex.counterfactual(clf, xs, 3, generator=flow, max_steps=5)
    restored = torch.backends.cudnn.allow_tf32 is True
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    err = float(r.recon_error.max())
    return err < 1e-4 and restored, f"round trip {err:.1e} in the search (TF32 outside it: {tf32_err:.1e}); flags restored: {restored}"


@check("nmf: batched HALS solver on CUDA = CPU, error vs scikit-learn; batched speed")
def _():
    from manifex.concepts import nmf
    from manifex.concepts.nmf import nmf_error
    g = torch.Generator().manual_seed(0)
    X = torch.rand(10, 2000, 64, generator=g, dtype=torch.float64) ** 3
    W1, H1 = nmf(X, 6, solver="hals")
    W2, H2 = nmf(X.to(cuda), 6, solver="hals")
    e1, e2 = nmf_error(X, W1, H1), nmf_error(X, W2.cpu(), H2.cpu())
    rel = float(((e1 - e2).abs() / e1).max())
    e_sk = nmf_error(X, *nmf(X, 6, solver="sklearn"))
    gap = float(((e2 - e_sk) / e_sk).max())
    Xf = X.float().to(cuda)
    t = gpu_time(lambda: nmf(Xf, 6, solver="hals"), repeat=3)
    return rel < 1e-6 and gap < 5e-3, f"CUDA vs CPU error {rel:.1e}; vs scikit-learn {gap:+.2%}; 10 classes × 2000×64 on GPU {t * 1e3:.0f} ms"


@check("class_concepts on CUDA (SmallResNet, 3 classes)")
def _():
    m = SmallResNet((1, 32, 32), 10).eval().to(cuda)
    xs = torch.rand(120, 1, 32, 32, device=cuda)
    pred = m(xs).argmax(1)
    classes = pred.unique()[:3].tolist()
    basis = manifex.class_concepts(m, xs, "layers.1" if hasattr(m, "layers") else list(dict(m.named_modules()))[-3],
                                   classes=classes, n_components=2, images_per_class=20,
                                   relevance_options={"n_samples": 4})
    v = basis.vectors
    return bool(torch.isfinite(v).all()) and bool((v >= 0).all()), f"vectors {tuple(v.shape)} on {v.device}"


@check("generator_spectrum: CUDA = CPU (exact, float64)")
def _():
    vae = VAE((1, 32, 32), 8).double().eval()
    z = torch.randn(4, 8, dtype=torch.float64)
    s1 = manifex.generator_spectrum(vae.decode, z)
    s2 = manifex.generator_spectrum(vae.to(cuda).decode, z.to(cuda))
    d = maxdiff(s1.singular_values, s2.singular_values) / float(s1.singular_values.max())
    return d < 1e-8, f"relative singular-value difference {d:.1e}"


print(f"\ntorch {torch.__version__}, {torch.cuda.get_device_name() if cuda.type == 'cuda' else 'cpu'}")
n_ok = sum(ok for _, ok, _ in RESULTS)
print(f"{n_ok}/{len(RESULTS)} checks passed")
sys.exit(0 if n_ok == len(RESULTS) else 1)
