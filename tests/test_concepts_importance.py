"""Concept importance (CRAFT's Sobol indices, gradient × coefficient), concept maps, stability, RelMax references.

Exact checks run in float64 (tolerances: float64 round-off, ~1e-10 relative, unless a bound is stated)."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from manifex.attribution.layer import layer_activations, outputs_from_layer
from manifex.concepts import (ConceptBasis, class_concepts, concept_coefficients, concept_importance, concept_maps,
                              concept_stability, jansen_total_indices, matrix_stability, nmf_transform, sobol_masks)
from manifex.errors import InputError

from _tiny_models import tiny_resnet


def _state(model: nn.Module):
    hooks = sum(len(getattr(m, a)) for m in model.modules()
                for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()], hooks,
            [b.clone() for b in model.buffers()], [p.detach().clone() for p in model.parameters()])


def _same_state(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and all(torch.equal(x, y) for x, y in zip(a[3], b[3])) \
        and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


class Quadratic(nn.Module):
    """features = ReLU(conv(x)) (the layer), then a global average pool, a linear map and, for class 0, its square:
    the logits are polynomials of degree ≤ 2 in the concept masks, so Gauss–Legendre quadrature is exact."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        z = self.fc(self.pool(self.features(x)).flatten(1))
        return torch.stack([z[:, 0] ** 2 + z[:, 1], z[:, 1]], 1)


def _basis(vectors: torch.Tensor, layer: str, classes=(0,)) -> ConceptBasis:
    C = vectors.shape[0]
    z = torch.zeros(C, dtype=vectors.dtype)
    return ConceptBasis(vectors=vectors, classes=list(classes), n_images=[1] * C, recon_error=z, relative_error=z, layer=layer)


def _upper(model: Quadratic, a: torch.Tensor) -> torch.Tensor:
    z = model.fc(model.pool(a).flatten(1))
    return torch.stack([z[:, 0] ** 2 + z[:, 1], z[:, 1]], 1)


def test_nmf_transform_equals_scikit_learn():
    from sklearn.decomposition import NMF

    X = torch.rand(150, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = NMF(4, random_state=0, tol=1e-12, max_iter=5000).fit(X.numpy())
    W = nmf_transform(X, torch.from_numpy(ref.components_), tol=1e-12, max_iter=5000)
    # both converge to the unique NNLS solution per row (H has full row rank): round-off of the CD iterations
    np.testing.assert_allclose(W.numpy(), ref.transform(X.numpy()), atol=1e-8)
    # rows are independent: a row's coefficients do not depend on the others in the batch
    assert torch.equal(nmf_transform(X[:7], torch.from_numpy(ref.components_)),
                       nmf_transform(X, torch.from_numpy(ref.components_))[:7])


def test_sobol_design_is_craft_replicated_design():
    k, n = 3, 16
    m = sobol_masks(k, n)
    assert m.shape == ((k + 2) * n, k) and bool(((m >= 0) & (m < 1)).all())
    A, B = m[:n], m[n : 2 * n]
    for i in range(k):
        C = m[(2 + i) * n : (3 + i) * n]
        expect = A.clone()
        expect[:, i] = B[:, i]
        assert torch.equal(C, expect)
    y = torch.randn(2, (k + 2) * n, dtype=torch.float64)
    st = jansen_total_indices(y, k, n)
    for i in range(k):
        fa, fc = y[:, :n], y[:, (2 + i) * n : (3 + i) * n]
        by_hand = ((fa - fc) ** 2).mean(1) / 2 / fa.var(1, unbiased=True)
        torch.testing.assert_close(st[:, i], by_hand, rtol=1e-12, atol=0)


def _exact_total_indices(f, k: int, nodes: int = 4) -> torch.Tensor:
    """Exact total Sobol indices of f on [0, 1]^k (uniform masks) by tensor Gauss–Legendre quadrature; exact
    for polynomials of degree ≤ 2·nodes − 1 per coordinate (f² here has degree 4)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    t, w = torch.from_numpy((t + 1) / 2), torch.from_numpy(w / 2)
    grid = torch.tensor(list(itertools.product(range(nodes), repeat=k)))
    weights = w[grid].prod(1)
    y = f(t[grid]).reshape((nodes,) * k)
    W = weights.reshape((nodes,) * k)
    mean = (W * y).sum()
    var = (W * y**2).sum() - mean**2
    out = []
    for i in range(k):
        cond_mean = (W * y).sum(i, keepdim=True) / W.sum(i, keepdim=True)  # E[f | m_~i]
        e_var = (W * (y - cond_mean) ** 2).sum()  # E_{~i} Var_i(f)
        out.append(e_var / var)
    return torch.stack(out)


def test_sobol_indices_match_exact_variance_decomposition():
    model = Quadratic().double().eval()
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    basis = _basis(H[None], "features", classes=(0,))
    n_design = 4096
    got = concept_importance(model, x, basis, method="sobol", n_design=n_design, batch_size=1)
    a = layer_activations(model, x, "features")
    u = concept_coefficients(a, H)  # (n, h, w, k)
    exact = []
    for i in range(x.shape[0]):
        def f(m, i=i):  # logit of class 0 at masks m (M, k), the activation rebuilt as (u ⊙ m) H
            rebuilt = (u[i][None] * m[:, None, None, :]) @ H
            return _upper(model, rebuilt.permute(0, 3, 1, 2))[:, 0]
        exact.append(_exact_total_indices(f, 3))
    exact = torch.stack(exact).mean(0)
    # QMC error of the Jansen sums: the integrands are degree-4 polynomials in the design's coordinates, whose
    # error on the first N unscrambled Sobol points falls as O((log N)^s / N): measured 7e-3 at N = 256, 9e-4 at
    # 1,024 and 2.2e-4 at 4,096 (deterministic: float64, an unscrambled sequence, no machine dependence); the
    # tolerance keeps a >20x margin at 4,096.
    torch.testing.assert_close(got[0], exact, atol=5e-3, rtol=0)
    assert exact.sum() > 0.5 and int(exact.argmax()) == int(got[0].argmax())


def test_sobol_batched_equals_a_loop_over_masks_also_around_a_skip_connection():
    model = copy.deepcopy(tiny_resnet()).double().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for layer in ("blocks.0", "blocks.1.relu1"):  # relu1 sits inside a residual block: every row runs the whole model
        a = layer_activations(model, x, layer)
        H = torch.rand(2, 3, a.shape[1], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        basis = _basis(H, layer, classes=(1, 2))
        n_design = 8
        got = concept_importance(model, x, basis, n_design=n_design, batch_size=2, max_rows=16)
        masks = sobol_masks(3, n_design).double()
        module = dict(model.named_modules())[layer]
        for ci, cls in enumerate((1, 2)):
            per_image = []
            for i in range(x.shape[0]):
                u = concept_coefficients(a[i : i + 1], H[ci])[0]  # (h, w, k)
                ys = []
                for m in masks:
                    rebuilt = ((u * m) @ H[ci]).permute(2, 0, 1)[None]
                    with torch.no_grad():
                        ys.append(outputs_from_layer(model, module, layer, x[i : i + 1], rebuilt, reuse_prefix=False)[0, cls])
                per_image.append(jansen_total_indices(torch.stack(ys), 3, n_design))
            torch.testing.assert_close(got[ci], torch.stack(per_image).mean(0), rtol=1e-9, atol=1e-12)


def test_gradient_importance_equals_autograd_by_hand():
    model = Quadratic().double().eval()
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    basis = _basis(H, "features", classes=(0, 1))
    got = concept_importance(model, x, basis, method="gradient", batch_size=3)
    a = layer_activations(model, x, "features")
    for ci in range(2):
        u = concept_coefficients(a, H[ci]).requires_grad_(True)
        y = _upper(model, (u @ H[ci]).permute(0, 3, 1, 2))[:, ci].sum()
        (g,) = torch.autograd.grad(y, u)
        torch.testing.assert_close(got[ci], (g * u).sum((1, 2)).mean(0).detach(), rtol=1e-10, atol=1e-12)


class BiasFreeResNet(nn.Module):
    """A ReLU network without biases and with a residual block (the block's output is the layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU())
        self.conv1, self.relu1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=False))
        self.block = nn.ModuleList([self.conv1, self.relu1, self.conv2, self.relu2])

    def forward(self, x):
        s = self.stem(x)
        b = self.relu2(self.conv2(self.relu1(self.conv1(s))) + s)
        return self.head(b)


def _coefficient(model, x, layer, h):
    return torch.einsum("nchw,c->n", layer_activations(model, x, layer, create_graph=x.requires_grad), h)


def test_lrp_map_conserves_the_concept_coefficient_through_a_residual_block():
    from manifex.attribution import Composite, ResidualSum
    from manifex.attribution.lrp.rules import Epsilon, ZPlus

    model = BiasFreeResNet().double().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    h = torch.rand(4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    before = _state(model)
    # the ε rule and the residual split with stabilisers far below float64's resolution: the z-rule, which
    # conserves exactly in a network without biases (up to float64 round-off)
    maps = concept_maps(model, x, None, h, layer="relu2", method="lrp", composite=Composite.uniform(Epsilon(epsilon=1e-300)),
                        canonizers=(ResidualSum(stabilizer=1e-300),))
    assert maps.shape == x.shape
    torch.testing.assert_close(maps.sum((1, 2, 3)), _coefficient(model, x, "relu2", h), rtol=1e-10, atol=0)
    # the residual split matters: without it the shortcut's relevance is counted twice
    twice = concept_maps(model, x, None, h, layer="relu2", method="lrp", composite=Composite.uniform(Epsilon(epsilon=1e-300)),
                         canonizers=())
    assert not torch.allclose(twice.sum((1, 2, 3)), _coefficient(model, x, "relu2", h), rtol=1e-3)
    assert _same_state(before, _state(model))
    # a composite selects layers by the model's own names: z+ on conv1 alone changes the map
    named = concept_maps(model, x, None, h, layer="relu2", method="lrp", canonizers=(ResidualSum(stabilizer=1e-300),),
                         composite=Composite([("conv1", ZPlus(stabilizer=1e-300)), ((nn.Conv2d, nn.Linear), Epsilon(epsilon=1e-300))]))
    assert not torch.allclose(named, maps)


def test_deeplift_map_conserves_the_concept_difference_on_the_trained_resnet():
    model = copy.deepcopy(tiny_resnet()).double().eval()  # BatchNorm (biases) and residual blocks
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    base = torch.full((1, 8, 8), 0.3, dtype=torch.float64)
    basis = _basis(torch.rand(1, 2, 12, generator=torch.Generator().manual_seed(11), dtype=torch.float64), "blocks.1", (2,))
    maps = concept_maps(model, x, basis, (2, 1), method="deeplift", baseline=base)
    h = basis.vectors[0, 1]
    want = _coefficient(model, x, "blocks.1", h) - _coefficient(model, base[None], "blocks.1", h)
    torch.testing.assert_close(maps.sum((1, 2, 3)), want, rtol=1e-9, atol=1e-12)
    gxi = concept_maps(model, x, basis, (2, 1), method="gradient_x_input")
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_coefficient(model, xg, "blocks.1", h).sum(), xg)
    torch.testing.assert_close(gxi, x * g, rtol=1e-10, atol=1e-12)


def test_several_concepts_in_one_batch_equal_one_concept_at_a_time():
    model = copy.deepcopy(tiny_resnet()).double().eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    basis = _basis(torch.rand(2, 3, 12, generator=torch.Generator().manual_seed(15), dtype=torch.float64), "blocks.1", (0, 2))
    bases = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    for method, kw in (("lrp", {}), ("deeplift", {"baseline": bases}), ("gradient_x_input", {}), ("upsampled", {})):
        together = concept_maps(model, x, basis, 2, method=method, batch_size=4, **kw)  # 9 rows in 3 calls
        assert together.shape == (3, 3, 1, 8, 8)
        for j in range(3):
            one = concept_maps(model, x, basis, (2, j), method=method, **kw)
            torch.testing.assert_close(together[:, j], one, rtol=1e-10, atol=1e-12)
    # a per-image DeepLift reference is each image's own: its map sums to s(x_i) − s(x̄_i)
    maps = concept_maps(model, x, basis, (0, 1), method="deeplift", baseline=bases, batch_size=2)
    h = basis.vectors[0, 1]
    torch.testing.assert_close(maps.sum((1, 2, 3)), _coefficient(model, x, "blocks.1", h) - _coefficient(model, bases, "blocks.1", h),
                               rtol=1e-9, atol=1e-12)


def test_upsampled_map_is_the_coefficient_map():
    model = BiasFreeResNet().double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    h = torch.rand(4, dtype=torch.float64)
    up = concept_maps(model, x, None, h, layer="stem", method="upsampled")  # the stem keeps the 8×8 grid
    torch.testing.assert_close(up[:, 0], torch.einsum("nchw,c->nhw", layer_activations(model, x, "stem"), h))


def test_mistakes_are_one_line_errors_before_any_work():
    model = Quadratic().double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    basis = _basis(torch.rand(1, 3, 4, dtype=torch.float64), "features")
    for kwargs, words in (({"method": "shap"}, "method must be one of"), ({"n_design": 1}, "n_design must be at least 2"),
                          ({"indices": [torch.tensor([5])]}, "indices of class 0")):
        with pytest.raises(InputError, match=words):
            concept_importance(model, x, basis, **kwargs)
    with pytest.raises(InputError, match="channels"):
        concept_importance(model, x, _basis(torch.rand(1, 3, 5, dtype=torch.float64), "features"))
    with pytest.raises(InputError, match="dtype"):
        concept_importance(model, x.float(), basis)
    with pytest.raises(InputError, match="negative activations"):
        concept_importance(model, x, _basis(torch.rand(1, 3, 4, dtype=torch.float64), "features.0"))
    with pytest.raises(InputError, match="concept index 7 is out of range"):
        concept_maps(model, x, basis, (0, 7))
    with pytest.raises(InputError, match="method must be one of"):
        concept_maps(model, x, basis, (0, 0), method="cam")


def test_model_state_is_left_as_found_also_after_an_exception():
    model = copy.deepcopy(tiny_resnet()).double().train()  # train mode: BatchNorm statistics would move
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    basis = _basis(torch.rand(1, 2, 8, dtype=torch.float64), "blocks.0", (0,))
    before = _state(model)
    with pytest.warns(UserWarning):
        concept_importance(model, x, basis, n_design=4)
    concept_importance(model, x, basis, method="gradient")
    concept_maps(model, x, basis, (0, 0), method="gradient_x_input")
    from manifex.errors import ModelError

    with pytest.raises(ModelError, match="BatchNorm layer 'stem.1'"):  # LRP refuses train mode, naming the model's layer
        concept_maps(model, x, basis, (0, 0), method="lrp")
    from manifex.concepts import concept_prototypes

    concept_prototypes(model, x, basis, top_k=2, pool=1, rank_by="relevance")
    assert _same_state(before, _state(model))
    calls = {"n": 0}

    def fail(module, args, out):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")

    handle = model.head.register_forward_hook(fail)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        concept_importance(model, x, basis, n_design=4)
    assert _same_state(before, _state(model))
    handle.remove()


def test_stability_is_one_for_identical_seeds():
    model = tiny_resnet()
    from manifex.data import load_digits8

    x = load_digits8().x[:240]
    basis = class_concepts(model, x, "blocks.0", classes=[0, 1], n_components=3, images_per_class=24,
                           relevance_options={"n_samples": 0}, keep_matrix=True, seed=3)
    assert basis.matrix is not None and "matrix" not in basis.to_dict()
    same = concept_stability(model, basis, seeds=(3, 3), bootstrap=0)
    assert same.seed_cosine.shape == (2, 2, 3)
    # the same seed refits the same vectors; the cosine of a float64 unit vector with itself is 1 up to c·eps
    torch.testing.assert_close(same.cosine, torch.ones(2, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    st = concept_stability(model, basis, seeds=(4,), bootstrap=3)
    assert st.bootstrap_cosine.shape == (2, 3, 3)
    assert bool((st.cosine <= 1 + 1e-12).all()) and bool((st.cosine > 0).all())
    assert torch.equal(st.unstable(0.0), torch.zeros(2, 3, dtype=torch.bool))
    # halves are seeded: the same call gives the same cosines
    assert torch.equal(st.bootstrap_cosine, concept_stability(model, basis, seeds=(4,), bootstrap=3).bootstrap_cosine)
    with pytest.raises(InputError, match="keep_matrix"):
        concept_stability(model, class_concepts(model, x, "blocks.0", classes=[0], n_components=3, images_per_class=8,
                                                relevance_options={"n_samples": 0}))
    with pytest.raises(InputError, match="bootstrap"):
        matrix_stability(basis.matrix, basis.vectors, n_rows=basis.n_rows, rows_per_image=basis.rows_per_image, bootstrap=-1)


def test_relevance_ranked_references_are_the_cells_of_largest_concept_relevance():
    from manifex.concepts import concept_prototypes, pooled_concept_relevance

    model = Quadratic().double().eval()
    x = torch.rand(10, 1, 6, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    H = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    basis = _basis(H, "features", classes=(0, 1))
    rel = pooled_concept_relevance(model, x, basis, pool=2, batch_size=4)
    # by hand: ⟨a, ĥ⟩ · ⟨∂f_c/∂a, ĥ⟩ per position, 2×2 average-pooled
    a = layer_activations(model, x, "features").requires_grad_(True)
    hat = torch.nn.functional.normalize(H, dim=-1)
    for i, cls in enumerate((0, 1)):
        (g,) = torch.autograd.grad(_upper(model, a)[:, cls].sum(), a)
        r = torch.einsum("nchw,kc->nkhw", a.detach(), hat[i]) * torch.einsum("nchw,kc->nkhw", g, hat[i])
        torch.testing.assert_close(rel[:, i], torch.nn.functional.avg_pool2d(r, 2, 2), rtol=1e-10, atol=1e-14)
    protos = concept_prototypes(model, x, basis, top_k=3, pool=2, rank_by="relevance")
    assert protos.rank_by == "relevance" and protos.crops.shape[:3] == (2, 3, 3)
    flat = rel.permute(1, 2, 0, 3, 4).reshape(2, 3, -1)
    top = flat.float().topk(3, dim=-1)
    torch.testing.assert_close(protos.scores, top.values)
    assert torch.equal(protos.image_index, top.indices // 9)
    by_activation = concept_prototypes(model, x, basis, top_k=3, pool=2)
    assert by_activation.rank_by == "activation" and bool((by_activation.scores <= 1 + 1e-6).all())
    with pytest.raises(InputError, match="rank_by must be one of"):
        concept_prototypes(model, x, basis, rank_by="gradient")


def test_report_ranks_concepts_maps_them_and_marks_stability(tmp_path):
    from manifex.concepts.report import UNSTABLE_BELOW, run_concept_campaign, summarize, write_concepts_report
    from manifex.data import load_digits8

    model = tiny_resnet()
    x = load_digits8().x[:200]
    opts = {"layer": "blocks.1", "components": 3, "images_per_class": 12, "relevance": "deeplift", "samples": 1,
            "solver": "auto", "seed": 0, "batch_size": 64, "pool": 2, "top_k": 3, "strips": 1, "layout": "strip",
            "controls": 2, "geometry": "grid", "importance": "sobol", "sobol_designs": 8, "stability_seeds": 1,
            "stability_halves": 2, "map_method": "deeplift", "relmax": True}
    before = _state(model)
    records = run_concept_campaign(model, x, [0, 1], tmp_path, options=opts, progress=False)
    assert _same_state(before, _state(model))
    for r in records:
        assert len(r["importance"]) == 3 and sorted(r["importance_rank"]) == [0, 1, 2]
        assert r["importance"][r["importance_rank"][0]] == max(r["importance"])
        assert len(r["stability"]) == 3 and len(r["stability_bootstrap_cosine"]) == 2
        assert r["unstable"] == [j for j, v in enumerate(r["stability"]) if v < UNSTABLE_BELOW]
        assert (tmp_path / r["maps_figure"]).is_file() and len(r["relmax_top_image_index"]) == 3
        # DeepLift maps (baseline 0) sum to s(x) − s(0) of each concept on the class's example image
        basis_h = torch.tensor(r["vectors"])
        xi = x[r["map_image_index"] : r["map_image_index"] + 1]
        want = torch.stack(
            [_coefficient(model, xi, "blocks.1", h)[0] - _coefficient(model, torch.zeros_like(xi), "blocks.1", h)[0]
             for h in basis_h])
        # float32 model: the map's sum and the direct difference agree to float32 round-off of sums of ~100 terms
        torch.testing.assert_close(torch.tensor(r["map_sums"]), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    summary = summarize(records)
    assert summary["stability"]["concepts"] == 6 and summary["importance"]["method"] == "sobol"
    html = write_concepts_report(records, tmp_path, options=opts).read_text()
    assert "most important concept" in html and "maps.png" in html and "concept stability" in html.lower()


def test_nmf_takes_one_seed_per_matrix():
    from manifex.concepts import nmf

    # uniform noise without a spectral gap: the seed of the randomized SVD behind the start changes the result
    X = torch.rand(1, 200, 64, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    together = nmf(X.expand(3, -1, -1), 6, seed=[0, 5, 9])[1]
    assert not torch.allclose(together[0], together[1], atol=1e-3)
    for b, s in enumerate((0, 5, 9)):
        torch.testing.assert_close(together[b], nmf(X[0], 6, seed=s)[1], rtol=1e-9, atol=1e-10)
    with pytest.raises(InputError, match="2 seeds for 3 matrices"):
        nmf(X.expand(3, -1, -1), 6, seed=[0, 1])


# ------------------------------------------------------------------ the k most important concepts in the strips
def test_top_concepts_are_the_k_largest_per_class_in_index_order():
    from manifex.concepts import top_concepts

    imp = torch.tensor([[0.1, 0.7, 0.3, 0.9], [0.5, 0.5, 0.2, 0.0]], dtype=torch.float64)
    assert top_concepts(imp, 2).tolist() == [[1, 3], [0, 1]]
    assert top_concepts(imp, 1).tolist() == [[3], [0]]  # a tie goes to the lower index
    assert top_concepts(imp, 4).tolist() == [[0, 1, 2, 3]] * 2
    for n, msg in ((0, "1..4"), (5, "1..4"), (2.0, "1..4")):
        with pytest.raises(InputError, match=msg):
            top_concepts(imp, n)
    with pytest.raises(InputError, match="NaN"):
        top_concepts(torch.tensor([[float("nan"), 1.0]]), 1)


@pytest.fixture(scope="module")
def digits_basis():
    from manifex.data import load_digits8

    model = tiny_resnet()
    x = load_digits8().x[:200]
    basis = class_concepts(model, x, "blocks.1", classes=[0, 1, 2], n_components=3, images_per_class=12,
                           relevance="gradient_x_activation")
    return model, x, basis


def test_components_test_assembles_only_the_chosen_concepts(digits_basis):
    """concepts= per class: the strip is the chosen concepts' top crops (in the given order), the control as many
    random crops; all concepts in order give the default test exactly; fewer give another result."""
    from manifex.concepts import assemble, concept_prototypes, prediction_from_components

    model, x, basis = digits_basis
    protos = concept_prototypes(model, x, basis, top_k=2, pool=2)
    kw = dict(pool=2, n_control=4, strips_per_class=2, prototypes=protos, seed=3)
    full = prediction_from_components(model, x, basis, **kw)
    same = prediction_from_components(model, x, basis, concepts=[[0, 1, 2]] * 3, **kw)
    assert torch.equal(same.inputs, full.inputs) and torch.equal(same.p, full.p)
    assert torch.equal(same.control_p, full.control_p)
    chosen = torch.tensor([[2], [0], [1]])
    one = prediction_from_components(model, x, basis, concepts=chosen, **kw)
    for i in range(3):  # strip r of class i: the rank-r crop of its chosen concept
        want = assemble(protos.crops[i, chosen[i]][:, :2].transpose(0, 1))
        assert torch.equal(one.inputs[i], want)
    assert one.inputs.shape[-2] == full.inputs.shape[-2] // 3  # one crop high, not three
    assert not torch.equal(one.p, full.p) and one.control_p.shape == full.control_p.shape
    assert torch.equal(one.concepts, chosen)
    for bad, msg in (([[0, 1]] * 2, r"shape \(3, k\)"), ([[0, 3]] * 3, "outside 0..2"), ([[1, 1]] * 3, "more than once"),
                     ([[0.0]] * 3, "integer"), ("ab", "concept indices")):
        with pytest.raises(InputError, match=msg):
            prediction_from_components(model, x, basis, concepts=bad, **kw)


def test_campaign_uses_the_k_most_important_concepts_and_reports_both(tmp_path):
    """component_concepts=2 of 3: each class's strip holds the top 2 of its row of the importance matrix (the
    record's importance), the result differs from the all-concepts strips (kept beside it), and the summary and the
    report say so."""
    from manifex.concepts.report import run_concept_campaign, summarize, write_concepts_report
    from manifex.data import load_digits8

    model = tiny_resnet()
    x = load_digits8().x[:200]
    opts = {"layer": "blocks.1", "components": 3, "images_per_class": 12, "relevance": "gradient_x_activation",
            "samples": 0, "solver": "auto", "seed": 0, "batch_size": 64, "pool": 2, "top_k": 3, "strips": 2,
            "layout": "strip", "controls": 2, "geometry": "grid", "importance": "gradient", "component_concepts": 2}
    records = run_concept_campaign(model, x, [0, 1, 2], tmp_path, options=opts, progress=False)
    for r in records:
        imp = torch.tensor(r["importance"])
        assert r["component_concepts"] == sorted(imp.argsort(descending=True)[:2].tolist())
        assert len(r["include"]["p"]) == len(r["include"]["all_concepts"]["p"]) == 2
    assert any(r[pool]["p"] != r[pool]["all_concepts"]["p"] for r in records for pool in ("include", "exclude"))
    summary = summarize(records)
    assert summary["component_concepts"]["k"] == 2 and summary["component_concepts"]["method"] == "gradient"
    assert summary["include"]["concepts_all"]["n"] == summary["include"]["concepts"]["n"] == 6
    html = write_concepts_report(records, tmp_path, options=opts).read_text()
    assert "strips of the 2 most important concepts" in html and "strips of all 3 concepts" in html
    assert "concepts in the strip" in html
    # without the option nothing changes: no comparison, no list
    plain = run_concept_campaign(model, x, [0], tmp_path / "plain", options={**opts, "component_concepts": None},
                                 progress=False)
    assert "component_concepts" not in plain[0] and "all_concepts" not in plain[0]["include"]
    assert plain[0]["include"]["p"] == next(r for r in records if r["class"] == 0)["include"]["all_concepts"]["p"]


@pytest.mark.parametrize("change,message", [
    ({"importance": "none", "component_concepts": 2}, "--importance none ranks none"),
    ({"component_concepts": 4}, "--component-concepts 4 exceeds --components 3"),
])
def test_component_concepts_mistakes_are_refused_before_training(tmp_path, monkeypatch, change, message):
    from click.testing import CliRunner

    import manifex.models.zoo as zoo
    from manifex.cli import main

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    args = ["concepts", "--dataset", "digits8", "--epochs", "1", "--layer", "blocks.1", "--components", "3", "--quiet",
            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    for key, value in change.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_component_concepts_is_guarded_only_when_given():
    from manifex.concepts import ConceptsConfig, ConceptsExperiment

    assert "component_concepts" not in ConceptsExperiment().settings(ConceptsConfig())
    assert ConceptsExperiment().settings(ConceptsConfig(component_concepts=2))["component_concepts"] == 2
