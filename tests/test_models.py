"""Tests of manifex.models: classifiers, generative models, PGD-l2, training, the checkpoint cache and resume."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manifex.models.training as training_mod
from manifex.data import load_digits8
from manifex.data.base import ImageDataset
from manifex.errors import DataError, InputError
from manifex.models import (
    VAE,
    AdversarialConfig,
    ClassifierConfig,
    ConvAutoencoder,
    GenerativeConfig,
    GenerativeTrainConfig,
    ModelCache,
    TrainConfig,
    accuracy,
    build_classifier,
    build_generative,
    fit_classifier,
    get_classifier,
    get_generative,
    pgd_l2,
    predict,
)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    """200 scikit-learn digits, 1×8×8 in [0, 1]."""
    return load_digits8().subset(slice(0, 200))


@pytest.fixture(scope="module")
def digits_other() -> ImageDataset:
    """A different set of 200 digits (different data fingerprint)."""
    return load_digits8().subset(slice(200, 400))


def _tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_classifier(ClassifierConfig("mlp", (1, 8, 8), 10)).eval()


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------ classifiers

ARCHS = ["mlp", "lenet", "vgg", "resnet"]
SHAPES = [(1, 8, 8), (1, 32, 32), (3, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS)
def test_classifier_output_shape_and_relu_modules(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(arch, shape, 7))
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) > 0
    # Every ReLU module is actually called in forward (no functional relu bypassing the modules).
    fired: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, i, o: fired.add(id(mod))) for m in relus]
    try:
        x = torch.rand(3, *shape)
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert fired == {id(m) for m in relus}
    # No functional relu sneaking in: replacing the ReLU modules by identities changes the output.
    model.eval()
    ref = model(x)
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, cname, nn.Identity())
    assert not torch.allclose(model(x), ref)


def test_unknown_classifier_arch() -> None:
    with pytest.raises(InputError, match="unknown classifier"):
        build_classifier(ClassifierConfig("transformer", (1, 8, 8), 10))


def test_lenet_32_matches_seed_architecture() -> None:
    model = build_classifier(ClassifierConfig("lenet", (1, 32, 32), 10))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (3, 3)), (32, 64, (3, 3))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(12544, 128), (128, 10)]
    assert sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout)) == [0.25, 0.5]
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_lenet_too_small_image() -> None:
    with pytest.raises(InputError, match="at least 6"):
        build_classifier(ClassifierConfig("lenet", (1, 4, 4), 10))


# ----------------------------------------------------------------------------------- generative models


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 16, 16), (3, 16, 16), (1, 32, 32)], ids=lambda s: "x".join(map(str, s)))
def test_vae_interface(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    vae = VAE(shape, latent_dim=5).eval().requires_grad_(False)
    assert vae.latent_dim == 5 and vae.image_shape == shape
    x = torch.rand(4, *shape)
    z = vae.encode(x)
    assert z.shape == (4, 5)
    xr = vae.decode(torch.randn(6, 5))
    assert xr.shape == (6, *shape)
    assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
    rec = vae.decode(vae.encode(x))
    assert rec.shape == x.shape
    assert torch.allclose(vae.reconstruct(x), rec) and torch.allclose(vae(x), rec)
    # encode is the deterministic posterior mean.
    mu, logvar = vae.encode_distribution(x)
    assert torch.equal(mu, z) and logvar.shape == (4, 5)
    assert vae.sample_latent(3, generator=torch.Generator().manual_seed(0)).shape == (3, 5)


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 12, 12), (1, 16, 32), (1, 4, 4)])
def test_vae_rejects_unsupported_sides(shape: tuple[int, int, int]) -> None:
    with pytest.raises(InputError, match="32×32"):
        VAE(shape)


def test_vae_28_error_hints_padding() -> None:
    with pytest.raises(InputError) as e:
        build_generative(GenerativeConfig("vae", (1, 28, 28), 10))
    msg = str(e.value)
    assert "28×28" in msg and "pad" in msg and "32×32" in msg


def test_vae_32_matches_research_architecture() -> None:
    k = 10
    vae = VAE((1, 32, 32), latent_dim=k)
    enc = list(vae.encoder)
    convs = [m for m in enc if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert [c.in_channels for c in convs] == [1, 32, 32]
    assert all(c.out_channels == 32 and c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    # Convolutions come first, then flatten and the MLP 512 → 256 → 256 → 2k.
    assert [(l.in_features, l.out_features) for l in enc if isinstance(l, nn.Linear)] == [(512, 256), (256, 256), (256, 2 * k)]
    assert isinstance(enc[-1], nn.Linear)
    dec = list(vae.decoder)
    assert [(l.in_features, l.out_features) for l in dec if isinstance(l, nn.Linear)] == [(k, 256), (256, 256), (256, 512)]
    unflat = [m for m in dec if isinstance(m, nn.Unflatten)]
    assert len(unflat) == 1 and tuple(unflat[0].unflattened_size) == (32, 4, 4)
    tconvs = [m for m in dec if isinstance(m, nn.ConvTranspose2d)]
    assert len(tconvs) == 3
    assert all(t.kernel_size == (4, 4) and t.stride == (2, 2) for t in tconvs)
    assert tconvs[-1].out_channels == 1
    # order: linears, unflatten, transposed convs, sigmoid last
    assert dec.index(unflat[0]) > max(dec.index(l) for l in dec if isinstance(l, nn.Linear))
    assert dec.index(unflat[0]) < dec.index(tconvs[0])
    assert isinstance(dec[-1], nn.Sigmoid)
    assert all(not isinstance(m, nn.Sigmoid) for m in dec[:-1])
    assert any(isinstance(m, nn.ReLU) for m in enc) and any(isinstance(m, nn.ReLU) for m in dec)
    # decode_logits is the decoder without its final sigmoid
    z = torch.randn(2, k)
    assert torch.allclose(torch.sigmoid(vae.decode_logits(z)), vae.decode(z), atol=1e-6)


@pytest.mark.parametrize("tc_beta", [None, 6.0])
def test_vae_loss_finite_and_decreases(digits: ImageDataset, tc_beta: float | None) -> None:
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=4)
    x = digits.x[:32]

    def loss_fixed_noise() -> torch.Tensor:
        torch.manual_seed(123)
        return vae.loss(x, tc_beta=tc_beta, dataset_size=200)

    with torch.no_grad():
        before = float(loss_fixed_noise())
    assert torch.isfinite(torch.tensor(before))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(15):
        loss = vae.loss(x, tc_beta=tc_beta, dataset_size=200)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_fixed_noise())
    assert after < before


def test_vae_kl_term_nonnegative(digits: ImageDataset) -> None:
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=4)
    x = digits.x[:16]
    with torch.no_grad():
        torch.manual_seed(1)
        rec_only = float(vae.loss(x, beta=0.0))
        torch.manual_seed(1)
        full = float(vae.loss(x, beta=1.0))
    assert full >= rec_only


@pytest.mark.parametrize("shape,channels", [((1, 16, 16), 4), ((3, 32, 32), 2), ((1, 8, 12), 3)])
def test_conv_autoencoder_flattened_spatial_latent(shape: tuple[int, int, int], channels: int) -> None:
    torch.manual_seed(0)
    ae = build_generative(GenerativeConfig("autoencoder", shape, channels)).eval().requires_grad_(False)
    assert isinstance(ae, ConvAutoencoder)
    c, h, w = shape
    assert ae.latent_dim == channels * (h // 4) * (w // 4)
    x = torch.rand(3, *shape)
    z = ae.encode(x)
    assert z.shape == (3, ae.latent_dim)
    xr = ae.decode(z)
    assert xr.shape == x.shape
    assert float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
    assert torch.allclose(ae.reconstruct(x), xr)
    assert torch.isfinite(ae.loss(x))


def test_conv_autoencoder_rejects_bad_sides_and_unknown_arch() -> None:
    with pytest.raises(InputError, match="divisible by 4"):
        ConvAutoencoder((1, 10, 10))
    with pytest.raises(InputError, match="unknown generative"):
        build_generative(GenerativeConfig("gan", (1, 8, 8), 4))


# ---------------------------------------------------------------------------------------------- pgd_l2


def test_pgd_per_example_balls_and_range(digits: ImageDataset) -> None:
    model = _tiny_mlp()
    x, y = digits.x[:3], digits.y[:3]
    eps = torch.tensor([0.1, 1.0, 3.0])
    g = torch.Generator().manual_seed(0)
    x_adv = pgd_l2(model, x, y, eps, steps=10, generator=g)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all(), norms
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # the big balls are actually used (the batch norm is not shared across examples)
    assert norms[2] > 1.0
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="sum")
        adv = F.cross_entropy(model(x_adv), y, reduction="sum")
    assert adv >= clean
    # no gradients leak into the model's parameters
    assert all(p.grad is None for p in model.parameters())


def test_pgd_raises_loss_per_example_without_random_start(digits: ImageDataset) -> None:
    model = _tiny_mlp(1)
    x, y = digits.x[:16], digits.y[:16]
    x_adv = pgd_l2(model, x, y, 0.5, steps=5, random_start=False)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-5).all()
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (adv >= clean - 1e-6).all()
    assert float(adv.mean()) > float(clean.mean())


def test_pgd_single_step_is_normalised_gradient() -> None:
    model = _tiny_mlp(2)
    x = torch.full((4, 1, 8, 8), 0.5)
    x[1] += 0.1 * torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 3, 5, 9])
    eps = torch.tensor([0.05, 0.1, 0.2, 0.02])
    step_factor = 0.5  # step 0.5·ε stays inside the ball: no projection, and no pixel leaves [0, 1]
    x_adv = pgd_l2(model, x, y, eps, steps=1, step_factor=step_factor, random_start=False)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    direction = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = x + (step_factor * eps / 1).view(-1, 1, 1, 1) * direction
    assert torch.allclose(x_adv, expected, atol=1e-6)
    assert torch.allclose((x_adv - x).flatten(1).norm(dim=1), step_factor * eps, atol=1e-6)


# -------------------------------------------------------------------------------------------- training


def test_fit_classifier_beats_chance(digits: ImageDataset) -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("mlp", digits.image_shape, digits.num_classes))
    before = accuracy(model, digits)
    info = fit_classifier(model, digits, TrainConfig(epochs=2, batch_size=16, lr=3e-3), progress=False)
    assert not model.training
    assert len(info["history"]) == 2 and all(torch.isfinite(torch.tensor(info["history"])))
    assert info["history"][1] < info["history"][0]
    acc = accuracy(model, digits)
    assert acc > 0.3 and acc > before
    logits = predict(model, digits.x[:10], batch_size=3)
    assert logits.shape == (10, 10)


def test_adversarial_training_runs(digits: ImageDataset) -> None:
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("lenet", digits.image_shape, digits.num_classes))
    cfg = TrainConfig(epochs=1, batch_size=50, adversarial=AdversarialConfig(epsilons=(0.5,), steps=2))
    info = fit_classifier(model, digits.subset(slice(0, 100)), cfg, progress=False)
    assert not model.training
    assert len(info["history"]) == 1 and torch.isfinite(torch.tensor(info["history"][0]))


def test_predict_restores_mode(digits: ImageDataset) -> None:
    model = _tiny_mlp().train()
    predict(model, digits.x[:4])
    assert model.training


# ----------------------------------------------------------------------------------------------- cache

FAST = TrainConfig(epochs=1, batch_size=50)


def test_get_classifier_caches(tmp_path, digits: ImageDataset, digits_other: ImageDataset) -> None:
    cache = ModelCache(tmp_path)
    m1, info1 = get_classifier(digits, "mlp", FAST, cache=cache, progress=False)
    assert info1["cached"] is False and not m1.training
    files = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert files == [f"classifier-mlp-{info1['key']}.pt"]
    m2, info2 = get_classifier(digits, "mlp", FAST, cache=cache, progress=False)
    assert info2["cached"] is True and info2["key"] == info1["key"]
    assert info2["history"] == info1["history"]
    assert _state_equal(m1, m2) and not m2.training
    # The cache file is plain tensors + builtins: loadable with weights_only=True.
    payload = torch.load(cache.path("classifier-mlp", info1["key"]), weights_only=True)
    assert set(payload) == {"state_dict", "info"}
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in m1.state_dict().items())
    # A different seed or different data gives a different key.
    _, info_seed = get_classifier(digits, "mlp", TrainConfig(epochs=1, batch_size=50, seed=1), cache=cache, progress=False)
    _, info_data = get_classifier(digits_other, "mlp", FAST, cache=cache, progress=False)
    assert info_seed["cached"] is False and info_data["cached"] is False
    assert len({info1["key"], info_seed["key"], info_data["key"]}) == 3
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_corrupted_cache_file(tmp_path, digits: ImageDataset) -> None:
    cache = ModelCache(tmp_path)
    _, info = get_classifier(digits, "mlp", FAST, cache=cache, progress=False)
    path = cache.path("classifier-mlp", info["key"])
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match="delete it") as e:
        get_classifier(digits, "mlp", FAST, cache=cache, progress=False)
    assert str(path) in str(e.value)


def test_get_generative_caches(tmp_path, digits: ImageDataset) -> None:
    cache = ModelCache(tmp_path)
    cfg = GenerativeTrainConfig(epochs=1, batch_size=50)
    g1, info1 = get_generative(digits, "vae", 3, cfg, cache=cache, progress=False)
    assert info1["cached"] is False and not g1.training and g1.latent_dim == 3
    g2, info2 = get_generative(digits, "vae", 3, cfg, cache=cache, progress=False)
    assert info2["cached"] is True and info2["key"] == info1["key"]
    assert _state_equal(g1, g2)
    torch.load(cache.path("generative-vae", info1["key"]), weights_only=True)
    # Another latent size or architecture is another model.
    _, info3 = get_generative(digits, "vae", 4, cfg, cache=cache, progress=False)
    a1, info4 = get_generative(digits, "autoencoder", 2, cfg, cache=cache, progress=False)
    assert info3["cached"] is False and info4["cached"] is False
    assert len({info1["key"], info3["key"], info4["key"]}) == 3
    assert isinstance(a1, ConvAutoencoder) and a1.latent_dim == 2 * 2 * 2


# ---------------------------------------------------------------------------------------------- resume


def _interrupt_at_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make training raise KeyboardInterrupt when epoch ``epoch`` (1-based) starts."""
    real = training_mod._batches
    calls = {"n": 0}

    def batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training_mod, "_batches", batches)


def test_classifier_training_resumes_after_interrupt(tmp_path, monkeypatch: pytest.MonkeyPatch, digits: ImageDataset) -> None:
    # LeNet has dropout: the resumed run must also restore the global RNG stream to match exactly.
    cfg = TrainConfig(epochs=3, batch_size=50, seed=3, step_size=2, gamma=0.5)
    cache = ModelCache(tmp_path / "cache")
    with monkeypatch.context() as mp:
        _interrupt_at_epoch(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            get_classifier(digits, "lenet", cfg, cache=cache, progress=False)
    partials = list(cache.root.glob("*.partial.pt"))
    assert len(partials) == 1 and partials[0].name.startswith("classifier-lenet-")
    assert not [p for p in cache.root.glob("*.pt") if not p.name.endswith(".partial.pt")]
    state = torch.load(partials[0], weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1

    model, info = get_classifier(digits, "lenet", cfg, cache=cache, progress=False)
    assert info["cached"] is False
    assert len(info["history"]) == 3
    assert info["history"][0] == state["history"][0]
    assert not list(cache.root.glob("*.partial.pt"))  # the finished checkpoint replaces the partial one
    assert not model.training

    ref, ref_info = get_classifier(digits, "lenet", cfg, cache=ModelCache(tmp_path / "ref"), progress=False)
    assert ref_info["history"][0] == state["history"][0]
    assert info["history"] == ref_info["history"]
    assert _state_equal(model, ref)


def test_generative_training_resumes_after_interrupt(tmp_path, monkeypatch: pytest.MonkeyPatch, digits: ImageDataset) -> None:
    # The VAE loss samples ε ~ N(0, I) from the global RNG on every step.
    cfg = GenerativeTrainConfig(epochs=3, batch_size=50, seed=1)
    cache = ModelCache(tmp_path / "cache")
    with monkeypatch.context() as mp:
        _interrupt_at_epoch(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            get_generative(digits, "vae", 3, cfg, cache=cache, progress=False)
    (partial,) = cache.root.glob("*.partial.pt")
    state = torch.load(partial, weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    model, info = get_generative(digits, "vae", 3, cfg, cache=cache, progress=False)
    assert info["history"][:2] == state["history"]
    ref, ref_info = get_generative(digits, "vae", 3, cfg, cache=ModelCache(tmp_path / "ref"), progress=False)
    assert info["history"] == ref_info["history"]
    assert _state_equal(model, ref)


def test_fit_classifier_default_key_never_resumes_another_run(tmp_path, monkeypatch: pytest.MonkeyPatch, digits: ImageDataset, digits_other: ImageDataset) -> None:
    """fit_classifier with a cache but no key: a partial checkpoint is resumed only by the same data and model."""
    cfg = TrainConfig(epochs=2, batch_size=50)
    cache = ModelCache(tmp_path)

    def fresh(arch: str = "mlp") -> nn.Module:
        torch.manual_seed(0)
        return build_classifier(ClassifierConfig(arch, (1, 8, 8), 10))

    with monkeypatch.context() as mp:
        _interrupt_at_epoch(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            fit_classifier(fresh(), digits, cfg, cache=cache, progress=False)
    (partial,) = tmp_path.glob("*.partial.pt")
    first_epoch = torch.load(partial, weights_only=True)["history"]
    # Other data (or another architecture) with the same TrainConfig trains from scratch.
    other = fit_classifier(fresh(), digits_other, cfg, cache=cache, progress=False)
    assert other["history"] == fit_classifier(fresh(), digits_other, cfg, progress=False)["history"]
    assert other["history"][0] != first_epoch[0]
    fit_classifier(fresh("lenet"), digits, cfg, cache=cache, progress=False)
    # The same run resumes, and finishing removes its partial checkpoint.
    model = fresh()
    resumed = fit_classifier(model, digits, cfg, cache=cache, progress=False)
    assert resumed["history"][0] == first_epoch[0] and len(resumed["history"]) == 2
    ref = fresh()
    assert resumed["history"] == fit_classifier(ref, digits, cfg, progress=False)["history"]
    assert _state_equal(model, ref)
    assert not list(tmp_path.glob("*.partial.pt"))
