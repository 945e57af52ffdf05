"""DA-Diff (``dose_diffusion``): adaLN-Zero blocks that start as the identity, the residual diffusion's forward
process and sampler, determinism for a fixed seed, and the whole road: ``lowdose train`` on the bundled sample,
the MONAI bundle, and the inference engine on it (HU and geometry kept, ``--dose auto`` through the estimator).

The model trained here is tiny and trains for seconds: these tests prove the machinery, not denoising quality.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from lowdose import load_ct, simulate_low_dose
from lowdose.bundle import Bundle
from lowdose.denoise import Denoiser
from lowdose.errors import LowdoseError
from lowdose.networks import DoseDiffusion, build_network, count_gflops
from lowdose.networks.dose_diffusion import REGIONS, ConditionedBlock, starting_noise
from lowdose.training import TrainConfig
from lowdose.training.diffusion import is_diffusion

from .conftest import SAMPLE_DICOM

TINY_KWARGS = {"in_channels": 3, "features": [8, 16], "blocks_per_level": [1, 1], "embedding_dim": 16}


def _trained_like(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The network with every parameter drawn at random (seeded): the zero-initialised layers no longer hide the
    noise, the dose or the region, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return network.eval()


def _slab(batch: int = 1, size: tuple[int, int] = (40, 52), seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn((batch, 3, *size), generator=generator)


def test_adaln_zero_blocks_start_as_the_identity_and_film_blocks_do_not():
    x = torch.randn(2, 8, 12, 12)
    embedding, region = torch.randn(2, 16), torch.randn(2, 16)
    block = ConditionedBlock(8, 2, 16, "adaln_zero")
    assert torch.equal(block(x, embedding, region), x)  # zero gate: exactly the input, whatever the conditioning
    film = ConditionedBlock(8, 2, 16, "film")
    assert not torch.allclose(film(x, embedding, region), x)
    with torch.no_grad():  # a gate that has learnt something lets the mixer (and the region) through
        assert block.modulation is not None
        block.modulation.bias[16:] = 1.0
    assert not torch.allclose(block(x, embedding, region), x)

    network = build_network("dose_diffusion", **TINY_KWARGS, dose_conditioning=True, region_classes=5).eval()
    blocks = [m for m in network.modules() if isinstance(m, ConditionedBlock)]
    assert len(blocks) == 3  # encoder, bottom and decoder: every one of them starts as the identity
    for b in blocks:
        features = torch.randn(1, b.project.out_channels, 10, 10)
        assert torch.equal(b(features, torch.randn(1, 16), torch.randn(1, 16)), features)
    # untrained, the whole sampler returns the centre slice: a zero residual, whatever the noise and the steps
    x = _slab()
    for steps in (1, 2, 4):
        assert torch.equal(network(x, 0.25, torch.eye(5)[3:4], steps=steps), x[:, 1:2])


def test_output_shape_any_size_and_every_conditioning():
    x = _slab(batch=2, size=(37, 50))
    for conditioning in ("adaln_zero", "film"):
        network = _trained_like(
            build_network("dose_diffusion", **TINY_KWARGS, conditioning=conditioning, dose_conditioning=True)
        )
        with torch.inference_mode():
            assert network(x, torch.tensor([0.5, 0.1])).shape == (2, 1, 37, 50)
            residual = network.predict_residual(x, x[:, 1:2], torch.tensor([1.0, 0.5]))
        assert residual.shape == (2, 1, 37, 50)
    plain = _trained_like(build_network("dose_diffusion", **TINY_KWARGS, conditioning="none"))
    with torch.inference_mode():
        assert plain(x).shape == (2, 1, 37, 50)


def test_dose_and_region_reach_the_output_and_wrong_inputs_are_refused():
    network = _trained_like(
        build_network(
            "dose_diffusion",
            **TINY_KWARGS,
            dose_conditioning=True,
            region_classes=len(REGIONS),
            dose_embedding_dim=7,
            region_embedding_dim=9,
        )
    )
    x = _slab()
    abdomen, head = torch.eye(5)[3:4], torch.eye(5)[0:1]
    with torch.inference_mode():
        base = network(x, 0.25, abdomen)
        assert not torch.equal(base, network(x, 0.05, abdomen))  # the dose
        assert not torch.equal(base, network(x, 0.25, head))  # the region
        assert not torch.equal(base, network(x, 0.25))  # region unknown: nothing added
        external = network(x, None, None, torch.randn(1, 7), torch.randn(1, 9))  # a DA-CLIP encoder's embeddings
        assert external.shape == base.shape and not torch.equal(external, base)
        with pytest.raises(ValueError, match="dose-conditioned"):
            network(x)
        with pytest.raises(ValueError, match="region must be"):
            network(x, 0.25, torch.ones(1, 3))
        with pytest.raises(ValueError, match="sampling steps"):
            network(x, 0.25, steps=5)
    with pytest.raises(ValueError, match="no external region"):
        build_network("dose_diffusion", **TINY_KWARGS)(x, region_embedding=torch.randn(1, 9))
    with pytest.raises(ValueError, match="conditioning 'none'"):
        build_network("dose_diffusion", conditioning="none", dose_conditioning=True)
    with pytest.raises(ValueError, match="conditioning must be"):
        build_network("dose_diffusion", conditioning="adaln")


def test_the_sampler_steps_along_the_forward_process():
    """Given the true residual, one deterministic step from time t lands exactly on the forward process at time s
    with the same noise, and the last step on the normal-dose slice: the sampler and the training's noisy states
    are one process (a sign or a square-root wrong in either fails here)."""
    network = build_network("dose_diffusion", **TINY_KWARGS, noise_scale=0.1)
    generator = torch.Generator().manual_seed(4)
    normal, residual, noise = (torch.randn((2, 1, 8, 8), generator=generator) for _ in range(3))
    centre = normal + residual
    for t, s in ((1.0, 0.5), (0.75, 0.25), (0.5, 0.0), (1.0, 0.0)):
        state = network.noisy_state(centre, residual, torch.full((2,), t), noise)
        expected = network.noisy_state(centre, residual, torch.full((2,), s), noise)
        torch.testing.assert_close(network.step(state, centre, residual, t, s), expected)
    torch.testing.assert_close(network.noisy_state(centre, residual, torch.ones(2), noise), centre + 0.1 * noise)
    torch.testing.assert_close(network.noisy_state(centre, residual, torch.zeros(2), noise), normal)


def test_sampling_is_deterministic_for_a_seed_and_independent_of_the_batch():
    """The sampler's one random draw, the starting noise, is seeded by the slab itself (and a seed): the same
    input gives bit for bit the same output, alone or in a batch; another seed another sample; 1, 2 and 4 steps
    all run and differ."""
    network = _trained_like(build_network("dose_diffusion", **TINY_KWARGS, dose_conditioning=True))
    x = _slab(batch=3)
    noise = starting_noise(x)  # each slab its own draw, standard normal, the same alone as in a batch
    assert not torch.equal(noise[0], noise[1]) and torch.equal(starting_noise(x[1:2])[0], noise[1])
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05
    with torch.inference_mode():
        outputs = {steps: network(x, 0.25, steps=steps) for steps in (1, 2, 4)}
        for steps, output in outputs.items():
            assert torch.equal(output, network(x, 0.25, steps=steps))
            assert torch.isfinite(output).all()
        assert not torch.equal(outputs[1], outputs[2]) and not torch.equal(outputs[2], outputs[4])
        alone = network(x[1:2], 0.25, steps=2)
        torch.testing.assert_close(alone, outputs[2][1:2], rtol=0, atol=1e-5)  # the same noise as in the batch
        seeded = network(x, 0.25, steps=2, seed=7)
        assert torch.equal(seeded, network(x, 0.25, steps=2, seed=7))
        assert not torch.equal(seeded, outputs[2]) and not torch.equal(seeded, network(x, 0.25, steps=2, seed=8))
        # noise_scale 0: a cold residual diffusion, no draw at all, the seed changes nothing
        cold = network.noise_scale
        network.noise_scale = 0.0
        assert torch.equal(network(x, 0.25, seed=1), network(x, 0.25, seed=2))
        network.noise_scale = cold


def test_flops_per_step_stay_within_three_times_dose_unet():
    dose = {"dose_fraction": torch.tensor([0.25])}
    unet = count_gflops(build_network("dose_unet", in_channels=3, dose_conditioning=True), **dose)
    per_step = count_gflops(build_network("dose_diffusion", dose_conditioning=True, sampling_steps=1), **dose)
    two_steps = count_gflops(build_network("dose_diffusion", dose_conditioning=True, sampling_steps=2), **dose)
    assert unet < per_step < 3 * unet  # ~9.7 against 9.5 GFLOPs per 512x512 slice
    assert two_steps == pytest.approx(2 * per_step, rel=1e-3)  # forward is the whole sampler


def test_diffusion_config_section_is_checked():
    base = {"data": {"train": ["x"]}, "network": {"name": "dose_diffusion", "kwargs": {"in_channels": 3}}}
    assert TrainConfig.from_dict({**base, "diffusion": {"loss": "l2"}}).diffusion.loss == "l2"
    with pytest.raises(LowdoseError, match="diffusion.loss must be"):
        TrainConfig.from_dict({**base, "diffusion": {"loss": "huber"}})
    with pytest.raises(LowdoseError, match="is for the dose_diffusion network"):
        TrainConfig.from_dict({"data": {"train": ["x"]}, "diffusion": {"loss": "l1"}})
    with pytest.raises(LowdoseError, match="unknown key"):
        TrainConfig.from_dict({**base, "diffusion": {"steps": 2}})
    # the network decides the objective: a diffusion step for dose_diffusion, the output for every other
    assert is_diffusion(build_network("dose_diffusion")) and not is_diffusion(build_network("dose_unet"))


TINY = {
    "name": "tiny_diffusion",
    "seed": 5,
    "device": "cpu",
    "output_dir": "run",
    "data": {
        "mode": "simulated",
        "train": [str(SAMPLE_DICOM)],
        "validation": [str(SAMPLE_DICOM)],  # the machinery only: no quality is claimed
        "doses": [0.5, 0.1],
        "validation_doses": [0.25],
        "patch_size": 48,
        "patches_per_slice": 4,
        "slices_per_epoch": 8,
        "validation_slices": 1,
        "simulation_pool": 2,
    },
    "network": {
        "name": "dose_diffusion",
        "kwargs": {**TINY_KWARGS, "dose_conditioning": True, "sampling_steps": 2},
        "dose_estimator": True,
        "dose_estimator_kwargs": {"in_channels": 1, "features": [8, 16]},
    },
    "diffusion": {"loss": "l1"},
    "optim": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3},
}


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """``lowdose train`` on the bundled sample, the bundle written by its --bundle."""
    from lowdose.cli import main

    root = tmp_path_factory.mktemp("diffusion")
    (root / "train.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["train", str(root / "train.yaml"), "--bundle", str(root / "bundle"), "--quiet"]) == 0
    return root


def test_lowdose_train_runs_the_diffusion_objective_and_exports_a_bundle(tiny_bundle):
    history = json.loads((tiny_bundle / "run" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    for record in history["epochs"]:  # the denoising objective's record: the sampler is validated as shipped
        assert record["loss"] > 0 and record["dose_loss"] is not None
        assert np.isfinite(record["val_psnr_abdomen"]) and "val_psnr_abdomen_auto" in record
    bundle = Bundle.read(tiny_bundle / "bundle")
    assert bundle.network_name == "dose_diffusion" and bundle.dose_conditioning
    assert bundle.network_kwargs["sampling_steps"] == 2 and bundle.dose_estimator is not None
    assert bundle.metadata["validation"]["val_psnr_abdomen"] in [e["val_psnr_abdomen"] for e in history["epochs"]]
    assert (tiny_bundle / "bundle" / "docs" / "README.md").is_file()
    inference = json.loads((tiny_bundle / "bundle" / "configs" / "inference.json").read_text())
    assert inference["network_def"]["name"] == "dose_diffusion"
    network = build_network(bundle.network_name, **bundle.network_kwargs)
    assert isinstance(network, DoseDiffusion) and network.sampling_steps == 2


def test_denoiser_samples_the_bundle_keeping_hu_and_geometry(tiny_bundle):
    sample = load_ct(SAMPLE_DICOM)
    normal = dataclasses.replace(sample, hu=sample.hu[6:14].copy(), slice_positions_mm=None)  # 8 slices: seconds
    low = simulate_low_dose(normal, 0.25, seed=2)
    low.hu[:3, :5, :5] = -3024.0  # padding outside the field of view
    denoiser = Denoiser(tiny_bundle / "bundle", device="cpu")
    assert isinstance(denoiser.model.network, DoseDiffusion)
    result = denoiser(low, dose="auto")
    assert result.dose_source == "estimated" and 0 < result.dose_fraction <= 1  # the bundle's estimator
    first = result.volume
    np.testing.assert_array_equal(first.hu, denoiser(low, dose="auto").volume.hu)  # deterministic for an input
    assert first.hu.dtype == np.float32 and first.shape == low.shape
    assert first.spacing_mm == low.spacing_mm and first.origin_mm == low.origin_mm
    np.testing.assert_array_equal(first.direction, low.direction)
    assert np.all(first.hu[:3, :5, :5] == -3024.0)
    tissue = (normal.hu > 0) & (normal.hu < 100)  # HU stay HU
    assert abs(float(first.hu[tissue].mean() - low.hu[tissue].mean())) < 60
    # Within the input's range, give or take a barely trained network's overshoot at a bright edge (measured 10 HU).
    assert float(first.hu.min()) >= -3024.0 and float(first.hu.max()) <= float(low.hu.max()) + 50.0
    given = denoiser(low, dose=0.1)
    assert given.dose_fraction == 0.1 and given.dose_source == "given"
    assert not np.array_equal(given.volume.hu, first.hu)  # the dose reaches the network

    few = dataclasses.replace(low, hu=low.hu[3:6].copy())  # 1, 2 and 4 steps: each runs, each its own output
    outputs = [Denoiser(tiny_bundle / "bundle", device="cpu", steps=s)(few, dose=0.25).volume.hu for s in (1, 2, 4)]
    assert all(o.shape == few.shape and np.isfinite(o).all() for o in outputs)
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])
    np.testing.assert_array_equal(outputs[1], denoiser(few, dose=0.25).volume.hu)  # 2: the bundle's own
    with pytest.raises(LowdoseError, match="sampling steps"):
        Denoiser(tiny_bundle / "bundle", device="cpu", steps=8)
    with pytest.raises(LowdoseError, match="not a diffusion model"):
        Denoiser("redcnn", device="cpu", steps=2)
