"""The generator interface: adapters (manifex models, normflows, FrEIA, decoder-only), directions, errors,
and the batched GAN inversion (each row follows its batch-1 trajectory)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import manifex
from manifex.errors import InputError, ModelError
from manifex.models import VAE, ConvAutoencoder
from manifex.models.generators import (
    ApproximateGeneratorWarning,
    Generator,
    as_generator,
    flatten_latent,
    invert_generator,
    unflatten_latent,
)


def _normflows_flow(dim: int = 2) -> nn.Module:
    import normflows as nf

    torch.manual_seed(0)
    flows = []
    for _ in range(3):
        flows += [nf.flows.AffineCouplingBlock(nf.nets.MLP([dim // 2, 16, 2 * (dim - dim // 2)], init_zeros=False)),
                  nf.flows.Permute(dim, mode="swap")]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)


def _freia_inn(dim: int = 4) -> nn.Module:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    torch.manual_seed(0)

    def sub(ci: int, co: int) -> nn.Module:
        return nn.Sequential(nn.Linear(ci, 16), nn.Tanh(), nn.Linear(16, co))

    inn = Ff.SequenceINN(dim)
    for _ in range(3):
        inn.append(Fm.AllInOneBlock, subnet_constructor=sub, permute_soft=False)
    return inn


def test_vae_adapter_encode_is_posterior_mean():
    torch.manual_seed(0)
    vae = VAE((1, 8, 8), latent_dim=3).eval()
    g = as_generator(vae)
    assert g.kind == "vae" and not g.exact and g.module is vae
    x = torch.rand(4, 1, 8, 8)
    mu, _ = vae.encode_distribution(x)
    assert torch.equal(g.encode(x), mu)
    assert torch.equal(g.decode(mu), vae.decode(mu))
    assert as_generator(ConvAutoencoder((1, 8, 8))).kind == "autoencoder"
    with pytest.raises(ModelError, match="no likelihood"):
        g.log_prob(x)


def test_normflows_adapter_directions():
    flow = _normflows_flow().double()
    g = as_generator(flow)
    assert g.kind == "flow" and g.exact
    x = torch.randn(6, 2, dtype=torch.float64)
    z = g.encode(x)
    # normflows: inverse is x -> z, forward is z -> x.
    assert torch.equal(z, flow.inverse(x))
    torch.testing.assert_close(g.decode(z), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(g.log_prob(x), flow.log_prob(x))
    bpd = g.bits_per_dim(x, levels=None)
    torch.testing.assert_close(bpd, -flow.log_prob(x) / (2 * torch.log(torch.tensor(2.0, dtype=torch.float64))))


def test_freia_adapter_directions_and_log_prob():
    inn = _freia_inn().double()
    g = as_generator(inn)
    x = torch.randn(5, 4, dtype=torch.float64)
    z = g.encode(x)
    assert torch.equal(z, inn(x)[0])  # FrEIA: inn(x) is x -> z
    torch.testing.assert_close(g.decode(z), x, atol=1e-12, rtol=0)
    # log p(x) = log N(z) + log|det dz/dx|, checked against the brute-force Jacobian.
    J = torch.autograd.functional.jacobian(lambda v: inn(v[None])[0][0], x[0])
    ref = -0.5 * z[0].pow(2).sum() - 2 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) + torch.linalg.slogdet(J)[1]
    torch.testing.assert_close(g.log_prob(x)[0], ref, atol=1e-10, rtol=0)


def test_user_module_with_encode_decode_and_kind_override():
    class Linear(nn.Module):
        exact = True

        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(2.0))

        def encode(self, x):
            return x / self.a

        def decode(self, z):
            return z * self.a

    g = as_generator(Linear())
    assert g.kind == "custom" and g.exact
    x = torch.rand(3, 5)
    torch.testing.assert_close(g.decode(g.encode(x)), x)
    assert as_generator(g, kind="vae").kind == "vae"
    assert as_generator(g) is g


def test_decoder_only_needs_an_inversion():
    dec = nn.Sequential(nn.Linear(3, 6), nn.Sigmoid())
    with pytest.raises(InputError, match="latent_shape"):
        as_generator(dec)
    g = as_generator(dec, latent_shape=(3,), inversion={"max_steps": 5})
    assert g.kind == "gan" and not g.exact
    with pytest.warns(ApproximateGeneratorWarning):
        z = g.encode(torch.rand(2, 6))
    assert z.shape == (2, 3)
    g2 = as_generator(dec, encode=lambda x: x[:, :3])
    assert g2.encode(torch.ones(1, 6)).shape == (1, 3)


def test_clear_errors():
    with pytest.raises(InputError, match="no encode/decode"):
        as_generator(42)
    with pytest.raises(InputError, match="kind"):
        as_generator(VAE((1, 8, 8), 2), kind="diffusion")
    bad = Generator(lambda x: x / 0.0 * torch.where(x > 0.5, 0.0, 1.0), lambda z: z, exact=True)
    with pytest.raises(ModelError, match="non-finite"):
        bad.encode(torch.tensor([[0.9, 0.1]]))
    nan_lp = Generator(lambda x: x, lambda z: z, log_prob=lambda x: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(ModelError, match="log-det"):
        nan_lp.log_prob(torch.zeros(2, 2))


def test_round_trip_warns_approximate():
    g = Generator(lambda x: x, lambda z: z + 0.01, kind="vae")
    x = torch.rand(4, 3)
    with pytest.warns(ApproximateGeneratorWarning, match="approximate"):
        err = g.check_round_trip(x, tol=1e-3)
    torch.testing.assert_close(err, torch.full((4,), 0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.check_round_trip(x, tol=0.1)


def test_flatten_unflatten_multiscale():
    z = [torch.randn(2, 3, 4, 4), torch.randn(2, 12, 2, 2)]
    v = flatten_latent(z)
    assert v.shape == (2, 96)
    back = unflatten_latent(v, z)
    assert all(torch.equal(a, b) for a, b in zip(back, z))
    g = Generator(lambda x: x, lambda zz: flatten_latent(zz))
    torch.testing.assert_close(g.flat_decoder(z)(v), v)


def test_invert_generator_batched_equals_batch1_and_converges():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 10), nn.Sigmoid()).double()
    x = dec(torch.randn(4, 3, dtype=torch.float64)).detach()
    inv = invert_generator(dec, x, latent_shape=(3,), lr=0.1, max_steps=400, tol=1e-7)
    assert bool(inv.converged.all()) and bool((inv.mse < 1e-7).all())
    assert len(set(inv.steps.tolist())) > 1  # rows stopped at different steps
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    for i in range(4):
        one = invert_generator(dec, x[i : i + 1], z_init=z0[i : i + 1], lr=0.1, max_steps=400, tol=1e-7)
        assert int(one.steps[0]) == int(inv.steps[i])
        torch.testing.assert_close(one.z[0], inv.z[i], atol=1e-12, rtol=0)


def test_invert_generator_research_loop_at_batch_1():
    """Same z as the research loop (Adam, MSE of the clipped output, stop when loss < diff before stepping)."""
    torch.manual_seed(1)
    dec = nn.Sequential(nn.Linear(2, 8), nn.Sigmoid()).double()
    x = torch.rand(1, 8, dtype=torch.float64)
    z0 = torch.randn(1, 2, dtype=torch.float64)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        loss = nn.functional.mse_loss(dec(z).clip(0, 1), x)
        if loss < 1e-3:
            break
        loss.backward()
        opt.step()
    with pytest.warns(ApproximateGeneratorWarning):  # random x is not in the range of this decoder
        ours = invert_generator(dec, x, z_init=z0, max_steps=50)
    torch.testing.assert_close(ours.z, z.detach(), atol=1e-14, rtol=0)


def test_invert_generator_bad_input():
    dec = nn.Linear(2, 3)
    x = torch.rand(2, 3)
    with pytest.raises(InputError, match="lr"):
        invert_generator(dec, x, latent_shape=(2,), lr=0)
    with pytest.raises(InputError, match="max_steps"):
        invert_generator(dec, x, latent_shape=(2,), max_steps=0)
    with pytest.raises(InputError, match="z_init or latent_shape"):
        invert_generator(dec, x)
    with pytest.raises(InputError, match="batch size"):
        invert_generator(dec, x, z_init=torch.zeros(3, 2))
    with pytest.raises(InputError, match="NaN"):
        invert_generator(dec, torch.full((1, 3), float("nan")), latent_shape=(2,))


def test_top_level_exports():
    assert manifex.as_generator is as_generator and manifex.invert_generator is invert_generator


def test_log_prob_overflow_raises_or_returns_inf():
    """A non-finite log-density raises by default; strict=False returns −inf log p / +inf bits per dimension."""

    class Overflowing(nn.Module):
        exact = True

        def encode(self, x):
            return x.flatten(1)

        def decode(self, z):
            return z.reshape(-1, 1, 2, 2)

        def log_prob(self, x):
            lp = -x.flatten(1).pow(2).sum(1)
            return torch.where(x.flatten(1).amax(1) > 0.9, torch.tensor(float("nan")), lp)

    g = as_generator(Overflowing())
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.95]).reshape(2, 1, 2, 2)
    with pytest.raises(ModelError, match=r"non-finite .* examples \[1\]"):
        g.log_prob(x)
    lp = g.log_prob(x, strict=False)
    assert lp[1] == float("-inf") and torch.isfinite(lp[0])
    bpd = g.bits_per_dim(x, strict=False)
    assert bpd[1] == float("inf") and torch.isfinite(bpd[0])
