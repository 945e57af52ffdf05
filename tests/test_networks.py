"""Tests of lowdose.networks: registry, shapes, published sizes and costs, dose conditioning, training sanity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowdose.errors import LowdoseError
from lowdose.networks import (
    REDCNN,
    DoseAwareUNet,
    DoseEstimator,
    ESAUNet,
    UnknownNetworkError,
    available_networks,
    build_network,
    count_gflops,
    count_parameters,
    register_network,
)
from lowdose.networks.registry import _REGISTRY

DENOISERS = ["redcnn", "esaunet", "dose_unet"]


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    # One thread: these inputs are tiny, and on a busy 2-core machine thread hand-offs cost more than they save.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _image(*shape):
    # Normalised CT-like values: a soft-tissue level plus noise.
    return (0.3 + 0.05 * torch.randn(*shape)).clamp(0, 1)


@pytest.fixture(scope="module")
def sample_slab():
    """Three neighbouring slices of the bundled abdomen CT, normalised, cropped to an odd size."""
    from lowdose import load_ct, sample_ct_path

    hu = torch.from_numpy(load_ct(sample_ct_path()).hu[9:12].astype("float32"))
    _, height, width = hu.shape
    crop = hu[:, height // 2 - 48 : height // 2 + 49, width // 2 - 65 : width // 2 + 66]
    return ((crop.clamp(-1024, 3071) + 1024) / 4095)[None]


# --- registry -------------------------------------------------------------------------------------


def test_registry_lists_and_builds_every_network():
    assert set(available_networks()) >= {"redcnn", "esaunet", "dose_unet", "dose_estimator"}
    assert available_networks() == sorted(available_networks())
    expected = {"redcnn": REDCNN, "esaunet": ESAUNet, "dose_unet": DoseAwareUNet, "dose_estimator": DoseEstimator}
    for name, cls in expected.items():
        assert type(build_network(name)) is cls
    assert build_network("dose_unet", in_channels=3).in_channels == 3


def test_unknown_network_name_lists_the_available_ones():
    with pytest.raises(KeyError) as caught:
        build_network("unet-9000")
    message = str(caught.value)
    assert "unet-9000" in message and all(name in message for name in available_networks())
    assert isinstance(caught.value, (UnknownNetworkError, LowdoseError))


def test_register_network_round_trip_and_refuses_a_taken_name(monkeypatch):
    monkeypatch.setattr("lowdose.networks.registry._REGISTRY", dict(_REGISTRY))

    @register_network("tiny_test_net")
    class Tiny(nn.Module):
        def __init__(self, width: int = 2):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 1)

    assert "tiny_test_net" in available_networks()
    assert build_network("tiny_test_net", width=5).conv.out_channels == 5
    with pytest.raises(ValueError, match="already registered"):
        register_network("tiny_test_net")(REDCNN)


# --- shapes, determinism, gradients ---------------------------------------------------------------


@pytest.mark.parametrize("name", DENOISERS)
def test_odd_sized_slice_keeps_its_shape(name):
    net = build_network(name).eval()
    x = _image(1, 1, 61, 77)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 1, 61, 77)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", DENOISERS)
def test_two_and_a_half_d_input_gives_the_centre_slice(name):
    net = build_network(name, in_channels=3).eval()
    with torch.no_grad():
        y = net(_image(2, 3, 64, 64))
    assert y.shape == (2, 1, 64, 64)


@pytest.mark.parametrize("name", DENOISERS)
def test_real_ct_slab_gives_a_finite_centre_slice(name, sample_slab):
    net = build_network(name, in_channels=3).eval()
    with torch.no_grad():
        y = net(sample_slab)
    assert sample_slab.shape == (1, 3, 97, 131)
    assert y.shape == (1, 1, 97, 131)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["esaunet", "dose_unet"])
def test_slices_smaller_than_the_padding_still_work(name):
    # Reflection cannot pad 5 pixels to 16; the networks fall back to replication.
    with torch.no_grad():
        assert build_network(name).eval()(_image(1, 1, 5, 9)).shape == (1, 1, 5, 9)


def test_dose_unet_is_a_residual_on_the_centre_slice():
    # output = centre - predicted noise, and the noise head starts at zero: an untrained network
    # returns the centre slice exactly, so training starts from the input, never below it.
    net = DoseAwareUNet(in_channels=3).eval()
    x = _image(1, 3, 37, 50)
    with torch.no_grad():
        assert torch.equal(net(x), x[:, 1:2])
        net.head.weight.normal_(std=0.1)
        assert not torch.equal(net(x), x[:, 1:2])


def test_redcnn_refuses_images_smaller_than_its_receptive_shrink():
    with pytest.raises(ValueError, match="larger than 20"):
        REDCNN()(_image(1, 1, 20, 64))


@pytest.mark.parametrize("name", DENOISERS + ["dose_estimator"])
def test_eval_mode_is_deterministic(name):
    net = build_network(name).eval()
    x = _image(2, 1, 29, 35)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("redcnn", {}),
        ("esaunet", {}),
        ("dose_unet", {"in_channels": 3, "dose_conditioning": True}),
        ("dose_estimator", {}),
    ],
)
def test_gradients_reach_every_layer(name, kwargs):
    net = build_network(name, **kwargs).train()
    x = _image(2, net.in_channels, 32, 32)
    args = (torch.tensor([0.5, 0.1]),) if kwargs.get("dose_conditioning") else ()
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-2)
    # Two steps: zero-initialised layers (FiLM, the estimator's output) pass gradient on after the first.
    for _ in range(2):
        optimiser.zero_grad()
        net(x, *args).square().mean().backward()
        optimiser.step()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    weights = [(n, p) for n, p in net.named_parameters() if n.endswith("weight")]
    dead = [n for n, p in weights if not p.grad.abs().sum() > 0]
    assert len(dead) <= 0.1 * len(weights), dead
    if kwargs.get("dose_conditioning"):
        assert all(block.film.weight.grad.abs().sum() > 0 for block in _film_blocks(net))


# --- published sizes and costs --------------------------------------------------------------------


def test_count_gflops_counts_a_multiply_accumulate_as_two():
    conv = nn.Conv2d(1, 8, 3, padding=1)
    assert count_gflops(conv) == pytest.approx(2 * 8 * 9 * 512 * 512 / 1e9)
    assert count_gflops(conv, (2, 1, 64, 64)) == pytest.approx(2 * 2 * 8 * 9 * 64 * 64 / 1e9)
    assert count_parameters(conv) == 8 * 9 + 8
    conv.bias.requires_grad_(False)
    assert count_parameters(conv, trainable_only=True) == 8 * 9


def test_redcnn_matches_the_paper_size_and_cost():
    net = REDCNN()
    assert count_parameters(net) == pytest.approx(1.85e6, rel=0.15)
    assert count_gflops(net) == pytest.approx(917, rel=0.15)


def test_esaunet_matches_the_published_size_and_cost():
    net = ESAUNet()
    assert count_parameters(net) == pytest.approx(4.9e6, rel=0.15)
    assert count_gflops(net) == pytest.approx(208, rel=0.25)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_default_network_is_cheap_enough_for_cpu(in_channels):
    plain = DoseAwareUNet(in_channels=in_channels)
    conditioned = DoseAwareUNet(in_channels=in_channels, dose_conditioning=True)
    assert count_gflops(plain) <= 25
    assert count_gflops(conditioned, dose_fraction=torch.tensor([0.25])) <= 25
    # Far cheaper than the baselines it replaces.
    assert count_gflops(plain) < count_gflops(ESAUNet()) / 8


def test_dose_estimator_is_cheap():
    assert count_gflops(DoseEstimator()) < 2


def test_in_plane_dose_estimator_reads_the_centre_slice_only():
    """Given a 2.5-D slab, a one-channel estimator reads the centre slice: its neighbours (which a single
    slice or a thick-slice series does not have) change nothing, and a lone slice reads as the slab does."""
    torch.manual_seed(0)
    estimator = DoseEstimator(in_channels=1).eval()
    with torch.no_grad():
        for p in estimator.parameters():
            p.add_(0.05 * torch.randn_like(p))  # not the zero-initialised output layer: a real dependence
        slab = 0.02 * torch.randn(2, 3, 64, 64)
        other = slab.clone()
        other[:, [0, 2]] = 0.2 * torch.randn(2, 2, 64, 64)
        centre = estimator(slab[:, 1:2])
        assert torch.allclose(estimator(slab), centre) and torch.allclose(estimator(other), centre)
        assert not torch.allclose(estimator(2 * slab[:, 1:2]), centre)  # it does read the centre's noise


# --- dose conditioning ----------------------------------------------------------------------------


def _film_blocks(net):
    return [m for m in net.modules() if getattr(m, "film", None) is not None]


def test_dose_conditioning_starts_as_the_plain_network_and_then_depends_on_dose():
    net = DoseAwareUNet(dose_conditioning=True).eval()
    plain = DoseAwareUNet(dose_conditioning=False).eval()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if k in plain.state_dict()})
    x = _image(2, 1, 40, 56)
    with torch.no_grad():
        at_half, at_tenth = net(x, torch.tensor([0.5, 0.5])), net(x, torch.tensor([0.1, 0.1]))
        assert torch.equal(at_half, at_tenth)
        assert torch.allclose(at_half, plain(x), atol=1e-6)
        assert torch.allclose(net(x, 0.5), at_half)  # a single float applies to the whole batch

        blocks = _film_blocks(net)
        assert len(blocks) >= 4
        net.head.weight.normal_(std=0.1)  # the noise head also starts at zero
        for block in blocks:
            block.film.weight.normal_(std=0.1)
            block.film.bias.normal_(std=0.1)
        at_half, at_tenth = net(x, torch.tensor([0.5, 0.5])), net(x, torch.tensor([0.1, 0.1]))
    assert (at_half - at_tenth).abs().max() > 1e-4


def test_dose_conditioned_network_needs_a_dose_and_plain_one_ignores_none():
    with pytest.raises(ValueError, match="dose_fraction"):
        DoseAwareUNet(dose_conditioning=True)(_image(1, 1, 32, 32))
    assert DoseAwareUNet()(_image(1, 1, 32, 32), None).shape == (1, 1, 32, 32)
    assert not _film_blocks(DoseAwareUNet())


# --- dose estimator -------------------------------------------------------------------------------


def test_dose_estimator_returns_log_dose_and_a_fraction_in_unit_interval():
    est = DoseEstimator().eval()
    x = _image(3, 1, 61, 77)
    log_dose = est(x)
    fraction = est.predict_dose_fraction(x)
    assert log_dose.shape == fraction.shape == (3,)
    assert (log_dose <= 0).all()
    assert ((fraction > 0) & (fraction <= 1)).all()
    assert torch.allclose(fraction, log_dose.exp())
    # Before training it answers the configured middle dose.
    assert fraction == pytest.approx(torch.full((3,), 0.2), rel=1e-5)
    assert DoseEstimator(in_channels=3)(_image(2, 3, 40, 40)).shape == (2,)


def test_dose_estimator_energy_rises_with_noise_on_real_ct(sample_slab):
    # The log-energy map the regressor reads must see added noise on a real slice.
    est = DoseEstimator().eval()
    centre = sample_slab[:, 1:2]
    noisier = centre + 0.01 * torch.randn(centre.shape)
    features = []
    est.noise_filter_bank.register_forward_hook(lambda module, inputs, output: features.append(output.square().mean()))
    with torch.no_grad():
        for x in (centre, noisier):
            assert 0 < float(est.predict_dose_fraction(x)) <= 1
    assert features[1] > 1.5 * features[0]


def test_dose_estimator_learns_noise_level_and_interpolates_unseen_doses():
    # A toy stand-in for simulated low dose: noise std ~ 1/sqrt(dose) on a smooth phantom.
    generator = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1, 1, 48), indexing="ij")
    phantom = (0.25 + 0.1 * ((xx**2 + yy**2) < 0.6).float())[None, None]

    def noisy(dose):
        std = 0.01 / torch.as_tensor(dose).sqrt()
        return phantom + std.reshape(-1, 1, 1, 1) * torch.randn(len(dose), 1, 48, 48, generator=generator)

    est = DoseEstimator()
    optimiser = torch.optim.Adam(est.parameters(), lr=3e-3)
    trained = torch.tensor([1 / 2, 1 / 4, 1 / 6, 1 / 10, 1 / 20])
    for _ in range(40):
        dose = trained[torch.randint(len(trained), (8,), generator=generator)]
        loss = (est(noisy(dose)) - dose.log()).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    est.eval()
    unseen = torch.tensor([1 / 3, 1 / 8]).repeat_interleave(8)
    predicted = est.predict_dose_fraction(noisy(unseen))
    error = (predicted.log() - unseen.log()).abs().mean()
    assert error < math.log(1.3), f"mean log-dose error {error:.3f} on unseen doses"
    # Ordered like the truth: 1/3 is recognised as a higher dose than 1/8.
    assert predicted[:8].median() > predicted[8:].median()


def test_folded_dose_conditioning_at_inference_equals_the_training_path():
    """With one dose per batch, inference folds FiLM into the expansion conv; it must give the same numbers."""
    net = DoseAwareUNet(in_channels=3, dose_conditioning=True).eval()
    net.head.weight.data.normal_(std=0.1)
    for block in _film_blocks(net):
        block.film.weight.data.normal_(std=0.1)
        block.film.bias.data.normal_(std=0.1)
    x = _image(2, 3, 48, 64)
    with torch.no_grad():
        folded = net(x, torch.tensor([0.1]))  # one dose for the batch: folded
        per_slice = net(x, torch.tensor([0.1, 0.1]))  # one dose per slice: not folded
    with torch.enable_grad():
        unfolded = net(x, 0.1).detach()  # grad mode never folds
    assert torch.allclose(folded, per_slice, atol=1e-5), (folded - per_slice).abs().max()
    assert torch.allclose(folded, unfolded, atol=1e-5), (folded - unfolded).abs().max()
    with torch.no_grad():  # two doses in a batch: the unfolded path, each slice with its own dose
        mixed = net(x, torch.tensor([0.1, 0.5]))
        assert torch.allclose(mixed[:1], folded[:1], atol=1e-5)
        assert not torch.allclose(mixed[1:], folded[1:], atol=1e-4)
        with pytest.raises(ValueError, match="3 doses for 2 slices"):
            net(x, torch.tensor([0.1, 0.2, 0.3]))


# --- noise conditioning ---------------------------------------------------------------------------


def test_measured_noise_reads_level_and_texture_of_real_ct(sample_slab):
    """On a real slice (the sample, normalised as bundles do: HU / 1000): the level rises by log 2 when the
    noise doubles, does not change under the self-ensemble's flips, reads about the same in a 96-pixel patch
    as in the slice, and the texture of smoothed noise reads lower than of white noise."""
    from lowdose import load_ct, sample_ct_path
    from lowdose.networks._noise_energy import measured_noise

    hu = torch.from_numpy(load_ct(sample_ct_path()).hu[10:11].astype("float32"))[None]
    generator = torch.Generator().manual_seed(1)
    white = 0.03 * torch.randn(hu.shape, generator=generator)
    smooth = nn.functional.avg_pool2d(white, 3, stride=1, padding=1) * 3  # same order of std, blotchier
    slice_ = lambda noise: (hu / 1000 + noise).clamp(-1.024, 3.071)  # noqa: E731
    louder = measured_noise(slice_(2 * white))[0]
    white_reading, smooth_reading = measured_noise(slice_(white))[0], measured_noise(slice_(smooth))[0]
    assert float(louder[0] - white_reading[0]) == pytest.approx(math.log(2), abs=0.1)
    assert float(white_reading[0]) == pytest.approx(math.log(3.0), abs=0.15)  # 30 HU over a quiet scan's 5
    assert float(smooth_reading[1]) < float(white_reading[1]) - 0.5
    flat = measured_noise(0.05 + white)[0]  # uniform soft tissue: exactly the noise's std, white: ratio 1
    assert float(flat[0]) == pytest.approx(math.log(3.0), abs=0.03) and abs(float(flat[1])) < 0.03
    flipped = measured_noise(slice_(white).flip(-1).transpose(-1, -2))[0]
    assert torch.allclose(flipped, white_reading, atol=1e-4)
    patch = measured_noise(slice_(white)[..., 208:304, 208:304])[0]
    assert float(patch[0]) == pytest.approx(float(white_reading[0]), abs=0.15)
    air = measured_noise(torch.full((1, 1, 64, 64), -1.024))[0]
    assert torch.isfinite(air).all() and float(air[0]) < -4  # nothing to measure: the floor, not NaN


def test_noise_conditioning_starts_as_the_dose_network_and_then_reads_the_noise():
    """Fine-tuning adds the noise embedding to a trained dose-conditioned network: at first its output is the
    network's without it (the loaded weights fit, the embedding adds zero); once trained, the same dose gives a
    different output for a louder input; without dose conditioning it is refused."""
    with_noise = DoseAwareUNet(in_channels=3, dose_conditioning=True, noise_conditioning=True).eval()
    dose_only = DoseAwareUNet(in_channels=3, dose_conditioning=True).eval()
    dose_only.head.weight.data.normal_(std=0.1)
    for block in _film_blocks(dose_only):
        block.film.weight.data.normal_(std=0.1)
    missing, unexpected = with_noise.load_state_dict(dose_only.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("noise_embedding.") for key in missing)
    x = _image(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.allclose(with_noise(x, 0.25), dose_only(x, 0.25), atol=1e-6)
        assert with_noise.noise_embedding is not None
        with_noise.noise_embedding.mlp[2].weight.normal_(std=0.1)
        quiet = x[:1]
        loud = quiet + 0.02 * torch.randn_like(quiet)
        shift = with_noise(loud, 0.25) - dose_only(loud, 0.25)
        quiet_shift = with_noise(quiet, 0.25) - dose_only(quiet, 0.25)
    assert (shift - quiet_shift).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs dose_conditioning"):
        DoseAwareUNet(noise_conditioning=True)
