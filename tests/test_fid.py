"""FID: Fréchet distance against closed forms, the FID Inception against torch-fidelity, weights I/O."""

import contextlib
import importlib
import importlib.util
import os
import shutil
import sys
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import scipy.linalg

from rfdit.metrics import fid
from rfdit.nn import inception
from rfdit.weights import read_tensors
from helpers import INSTALL_TEST_DEPS, relative_error, require

REFERENCE_NAME = "inception-v3-compat"


@contextlib.contextmanager
def user_mode():
    """Without the suite's runtime shape checks, as users run: the library's own errors must fire."""
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


# --- Fréchet distance ----------------------------------------------------------------------------


def eigen_frechet(mu1, sigma1, mu2, sigma2):
    # tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½), a symmetric PSD matrix: eigenvalues, no sqrtm.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sum(np.sqrt(np.clip(inner, 0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def random_statistics(rng, num_samples, dim, shift=0.0):
    x = rng.normal(size=(num_samples, dim)) @ rng.normal(size=(dim, dim)) / np.sqrt(dim) + shift
    return x.mean(axis=0), np.cov(x, rowvar=False)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 2, size=d), rng.uniform(0.1, 2, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize(
    "num_samples, dim, rel",
    [
        (500, 64, 1e-9),  # well conditioned
        (40, 64, 1e-6),  # rank 39 < 64: singular covariances, as with FID on fewer samples than 2048
        (65, 64, 1e-7),  # barely full rank: condition numbers around 1e4
    ],
)
def test_frechet_distance_matches_eigen_formula(num_samples, dim, rel):
    # sqrtm of a singular product is accurate to ~sqrt(machine eps) around its zero eigenvalues,
    # so the trace moves by ~1e-8 of the total there; 1e-6 keeps a margin, 1e-9 where nothing is singular.
    rng = np.random.default_rng(num_samples)
    mu1, sigma1 = random_statistics(rng, num_samples, dim)
    mu2, sigma2 = random_statistics(rng, num_samples, dim, shift=0.3)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        eigen_frechet(mu1, sigma1, mu2, sigma2), rel=rel
    )


def test_frechet_distance_singular_product_adds_eps(monkeypatch):
    # scipy's sqrtm rarely returns inf/nan nowadays; force it once to check pytorch-fid's fallback.
    rng = np.random.default_rng(1)
    mu1, sigma1 = random_statistics(rng, 200, 16)
    mu2, sigma2 = random_statistics(rng, 200, 16, shift=0.5)
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky_sqrtm)
    eps = 1e-2
    with pytest.warns(RuntimeWarning, match="singular"):
        got = fid.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
    offset = eps * np.eye(16)
    np.testing.assert_allclose(calls[1], (sigma1 + offset) @ (sigma2 + offset))
    # the offset enters only the cross term, exactly as in pytorch-fid
    tr_cross = eigen_frechet(mu1, sigma1 + offset, mu2, sigma2 + offset) - np.sum((mu1 - mu2) ** 2) - np.trace(
        sigma1 + offset
    ) - np.trace(sigma2 + offset)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) + tr_cross
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_raises_on_large_imaginary_part():
    # diag(-1, 1) is no covariance: sqrt(I · diag(-1, 1)) = diag(i, 1)
    with pytest.raises(ValueError, match="imaginary component of 1"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


def test_frechet_distance_rejects_mismatched_shapes():
    with user_mode(), pytest.raises(ValueError, match=r"sigma1 and sigma2 must be \(3, 3\)"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with user_mode(), pytest.raises(ValueError, match="mu1 and mu2"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- statistics --------------------------------------------------------------------------------


def test_compute_statistics_matches_numpy_cov():
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, size=(23, 4, 4, 3)).astype(np.float32) + np.linspace(0, 1, 23)[:, None, None, None]
    seen_sizes = []

    def feature_fn(x):  # a cheap stand-in for Inception: per-image means and corner pixels, 9-d
        seen_sizes.append(x.shape[0])
        x = np.asarray(x, np.float32)
        return np.concatenate([x.mean(axis=(1, 2)), x[:, 0, 0], x[:, -1, -1]], axis=1) * 10

    batches = [images[i : i + 8] for i in range(0, 23, 8)]  # 8, 8, 7
    mu, sigma = fid.compute_statistics(feature_fn, batches, progress=False)
    expected_mu, expected_sigma = fid.feature_statistics(feature_fn(images))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feature_fn(images).astype(np.float64), rowvar=False), rtol=1e-10)
    assert seen_sizes[:3] == [8, 8, 8]  # the short last batch is padded: a jitted feature_fn compiles once

    mu, sigma = fid.compute_statistics(feature_fn, iter(batches), num_images=12, progress=False)
    expected_mu, expected_sigma = fid.feature_statistics(feature_fn(images[:12]))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10)

    with pytest.raises(ValueError, match="ran out after 23 images"):
        fid.compute_statistics(feature_fn, batches, num_images=30, progress=False)


def test_compute_statistics_rejects_non_finite_features():
    batches = [np.zeros((2, 4, 4, 3), np.float32), np.full((2, 4, 4, 3), np.nan, np.float32)]
    with pytest.raises(ValueError, match="non-finite features for batch 1"):
        fid.compute_statistics(lambda x: np.asarray(x).reshape(x.shape[0], -1), batches, progress=False)


def test_statistics_round_trip_and_adm_npz(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = random_statistics(rng, 50, 8)
    fid.save_statistics(tmp_path / "stats.npz", mu, sigma)
    loaded_mu, loaded_sigma = fid.load_statistics(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    # ADM's reference batches carry the images and spatial statistics too
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=mu[:4], sigma_s=sigma[:4, :4])
    loaded_mu, loaded_sigma = fid.load_statistics(adm)
    assert loaded_mu.dtype == np.float64
    np.testing.assert_array_equal(loaded_sigma, sigma)


def test_load_statistics_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="keys 'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "absent.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"has keys \['arr_0'\].*missing \['mu', 'sigma'\]"):
        fid.load_statistics(tmp_path / "images.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"expected mu \(D,\) and sigma \(D, D\)"):
        fid.load_statistics(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="must end in .npz"):
        fid.save_statistics(tmp_path / "stats", np.zeros(3), np.eye(3))


# --- the Inception's input pipeline ------------------------------------------------------------


def test_quantize_pixels_matches_uint8_conversion():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 4096), [-1.0, 1.0, 0.0, -1 + 1 / 255]]).astype(np.float32)
    x = x.reshape(2, 25, 41, 2)  # (b, h, w, c)
    # DiT's sample_ddp.py: clamp(127.5·x + 128, 0, 255).to(uint8); the cast truncates
    expected = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(inception.quantize_pixels(jnp.asarray(x))), expected.astype(np.float32))
    # uint8 images mapped to [-1, 1] by u/127.5 - 1 come back exactly
    u = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    back = inception.quantize_pixels(jnp.asarray((u / 127.5 - 1).astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(back), u.astype(np.float32))


# --- parity with torch-fidelity ----------------------------------------------------------------


@pytest.fixture(scope="session")
def torch_fidelity_inception():
    """torch-fidelity's feature_extractor_inceptionv3 module, imported without its package __init__."""
    require("torch", "the Inception parity tests compare against torch-fidelity (PyTorch)")
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        # only where the README's test command was not run: the reason names the missing package and the command
        pytest.skip(f"torch-fidelity is not installed; the Inception parity tests compare against it. Install it with: {INSTALL_TEST_DEPS}")
    # The package __init__ imports torchvision; a bare package with the same __path__ lets the
    # submodules (which need only torch) import.
    if "torch_fidelity" not in sys.modules:
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


@pytest.fixture(scope="session")
def reference_weights(torch_fidelity_inception, tmp_path_factory):
    """A torch-fidelity-format .pth with random weights and random BatchNorm statistics."""
    import torch

    module = torch_fidelity_inception
    with pytest.MonkeyPatch.context() as patch:  # build the skeleton without its weight download
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        skeleton = module.FeatureExtractorInceptionV3(REFERENCE_NAME, ["2048"])
    generator = torch.Generator().manual_seed(0)

    def random_like(name, value):
        def rand():
            return torch.rand(value.shape, generator=generator)

        def randn():
            return torch.randn(value.shape, generator=generator)

        if name.endswith("conv.weight"):  # He-normal: activations stay O(1) through all 17 layers
            return randn() * (2.0 / value[0].numel()) ** 0.5
        if name.endswith(("bn.weight", "running_var")):
            return 0.5 + rand()
        if name.endswith(("bn.bias", "running_mean")):
            return 0.2 * randn()  # nonzero, so the folded BatchNorm shift is exercised
        if name.startswith("fc."):
            return 0.01 * randn()
        return value  # num_batches_tracked

    state = {name: random_like(name, value) for name, value in skeleton.state_dict().items()}
    path = tmp_path_factory.mktemp("inception") / inception.TORCH_FIDELITY_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def reference_features(torch_fidelity_inception, reference_weights):
    """Two random 64x64 uint8 images and torch-fidelity's pool3 features of them."""
    import torch

    reference = torch_fidelity_inception.FeatureExtractorInceptionV3(
        REFERENCE_NAME, ["2048"], feature_extractor_weights_path=str(reference_weights)
    )
    pixels = np.random.default_rng(5).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        (features,) = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    return pixels, features.numpy()


@pytest.mark.parametrize("size", [(64, 64), (17, 33), (299, 299), (320, 300)])
def test_resize_bilinear_tf1_matches_torch_fidelity(torch_fidelity_inception, size):
    import torch
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    image = np.random.default_rng(6).integers(0, 256, size=(*size, 3)).astype(np.float32)
    expected = interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(image.transpose(2, 0, 1)[None].copy()), size=(299, 299), align_corners=False
    )[0].numpy().transpose(1, 2, 0)
    got = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(image), 299, 299))
    # same float32 sample positions and interpolation order; XLA may fuse a multiply-add (1 ulp of 255)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_inception_matches_torch_fidelity(reference_weights, reference_features):
    pixels, expected = reference_features
    feature_fn = fid.fid_inception(reference_weights)
    images = (pixels / 127.5 - 1).astype(np.float32)  # [-1, 1]; quantisation recovers the uint8 exactly
    got = np.asarray(feature_fn(images))
    assert got.shape == (2, 2048) and got.dtype == np.float32
    # Measured ~3e-7: float32 sums over up to 4032 terms in another order, through 17 conv layers.
    # 1e-4 leaves that margin, while each of the graph's quirks moves features by far more (measured
    # at these weights: pads counted in the average pools 4e-2, Mixed_7c average-pooling 1e-1,
    # jax.image.resize instead of TF1's resize 1e-2, every pixel one uint8 level off 6e-3).
    assert relative_error(got, expected) < 1e-4


@eqx.filter_jit
def pool3_features(model, images):
    return jax.vmap(model)(images)


def test_convert_inception_weights_round_trips_without_torch(reference_weights, reference_features, tmp_path,
                                                             monkeypatch):
    from safetensors.numpy import load_file

    out = inception.convert_inception_weights(reference_weights, tmp_path / "fid_inception.safetensors")
    torch_state = read_tensors(reference_weights)
    stored = load_file(str(out))
    assert set(stored) == {name for name in torch_state if not name.endswith("num_batches_tracked")}
    for name, value in stored.items():
        np.testing.assert_array_equal(value, torch_state[name], err_msg=name)

    from_pth = inception.load_inception(reference_weights)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails: safetensors must not need it
    from_safetensors = inception.load_inception(out)
    with pytest.raises(ImportError, match="needs torch, but torch is not installed. Install torch once"):
        inception.load_inception(reference_weights)
    images = jnp.asarray((reference_features[0] / 127.5 - 1).astype(np.float32))
    np.testing.assert_array_equal(pool3_features(from_safetensors, images), pool3_features(from_pth, images))


def test_load_inception_default_location_converts_once(reference_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("RFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    # where torch-fidelity's own download would have left it
    shutil.copy(reference_weights, hub / inception.TORCH_FIDELITY_FILE)
    model = inception.load_inception()
    converted = tmp_path / "cache" / "inception" / "weights-inception-2015-12-05-6726825d.safetensors"
    assert converted.is_file()
    os.remove(hub / inception.TORCH_FIDELITY_FILE)
    monkeypatch.setitem(sys.modules, "torch", None)
    again = inception.load_inception()  # found in the cache, no torch needed
    pairs = zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(again), strict=True)
    assert all(np.array_equal(a, b) for a, b in pairs)


def test_load_inception_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setattr(inception, "_download", no_download)
    with pytest.raises(FileNotFoundError) as info:
        inception.load_inception()
    message = str(info.value)
    assert inception.WEIGHTS_URL in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "cache" / "inception") in message  # where to put it
    assert "HF_HUB_OFFLINE" in message  # why nothing was downloaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception.load_inception(tmp_path / "nowhere.safetensors")


def test_inception_from_state_dict_rejects_other_inceptions(reference_weights):
    state = read_tensors(reference_weights)
    torchvision_like = dict(state, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match="torchvision's ImageNet Inception-v3"):
        inception.inception_from_state_dict(torchvision_like)
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    missing = r"do not fit the FID Inception-v3 .*: missing Mixed_6b\.branch7x7_2\.bn\.running_var\. Expected"
    with pytest.raises(ValueError, match=missing):
        inception.inception_from_state_dict(state)
