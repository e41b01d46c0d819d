"""The organisers' 2024 metric against Keras itself (Keras 3 on the torch backend; no TensorFlow).

A Keras InceptionV3 with fixed, non-degenerate weights is written in the legacy HDF5 layout of the published
`inception_v3_weights_tf_dim_ordering_tf_kernels.h5`, loaded into the harness' PyTorch port, and both are run on real
dev images: the softmax outputs, and the whole `imageclef2024` metric as `harness score` computes it against the
organisers' pipeline written here with Keras (listing, reading, numpy.resize, preprocess_input, predict, FD, IS).

Weights: `keras.applications.InceptionV3(weights=None)` is built, then EVERY weight is overwritten from
numpy.random.default_rng(SEED), so the fixed seed alone decides them (Keras' own initialisers are not used: its
glorot-uniform kernels and unit BatchNorm statistics make the activations fade through 94 ReLU layers and the softmax
nearly uniform and identical for every image). Convolutions get He-normal kernels (activation scale kept through
the depth); every BatchNormalization gets a random beta and, as moving_mean / moving_variance, the statistics of its
own input on 8 other dev images (one forward pass, each layer calibrated after the layers before it), so the
activations stay normalised through the depth and every layer's statistics are distinct (one loaded into the wrong
slot shows); the classifier is a random projection (std DENSE_GAIN / sqrt(2048)) whose bias centres the pooled
features of those images, so the softmax is far from uniform and differs between images.

Reading: scikit-image is not installed here. The organisers' `skimage.io.imread` decodes JPEG/PNG with Pillow
(through imageio) and returns `np.asarray(image)`; the reference below does exactly that with Pillow, so it sees the
same uint8 arrays for these RGB JPEGs (same Pillow/libjpeg build); the harness' reader is a separate implementation.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

SEED = 20240
DEV_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imageclef2024" / "dev-256" / "images"
N_SOFTMAX, N_GEN, N_REAL, N_CALIBRATION = 6, 20, 12, 8
DENSE_GAIN = 8.0  # logit spread: the softmax peaks at 10-50x the uniform 1e-3 and differs between images
AUTO_NAMED = ("conv2d", "batch_normalization", "activation", "max_pooling2d", "average_pooling2d", "concatenate")


@pytest.fixture(scope="module")
def keras(tmp_path_factory):
    """Keras on the torch backend, on the CPU. The environment variables are set only around the import (Keras reads
    them then) and restored afterwards, so no other test sees them; KERAS_HOME keeps keras.json out of the home
    dir."""
    pytest.importorskip("h5py")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "torch":
        pytest.skip("keras is already imported with another backend")
    names = ("KERAS_BACKEND", "KERAS_HOME", "KERAS_TORCH_DEVICE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ["KERAS_TORCH_DEVICE"] = "cpu"  # float32 CPU on both sides, also on a GPU machine
    os.environ["KERAS_HOME"] = str(tmp_path_factory.mktemp("keras-home"))
    try:
        import keras as keras_module
    except ImportError:
        pytest.skip("keras is not installed (a dev dependency)")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert keras_module.backend.backend() == "torch"
    assert all(os.environ.get(k) == v for k, v in saved.items())  # nothing leaks into other tests
    return keras_module


def _dev_images(n: int, offset: int = 0) -> list[Path]:
    if not DEV_IMAGES.is_dir():
        pytest.skip("../shared/data/imageclef2024/dev-256 not present")
    names = sorted(os.listdir(DEV_IMAGES))
    return [DEV_IMAGES / name for name in names[offset:offset + n]]


def organisers_read(path: Path) -> np.ndarray:
    """skimage.io.imread for a JPEG/PNG: Pillow decodes, numpy array of the file's own mode (see module doc)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def organisers_inputs(paths: list[Path], keras) -> np.ndarray:
    """Steps 2-3 of the evaluator: read, numpy.resize(img, (299, 299, 3)) (flatten/truncate/repeat, no image
    resize), stack, then Keras' own inception_v3.preprocess_input."""
    from keras.applications.inception_v3 import preprocess_input

    batch = np.array([np.resize(organisers_read(p), (299, 299, 3)) for p in paths])
    return np.asarray(preprocess_input(batch.astype(np.float32)))


def _auto_index(name: str) -> int:
    """Keras' auto names: `conv2d`, `conv2d_1`, ... in creation order (0, 1, ...)."""
    m = re.fullmatch(r"[a-z0-9_]+?(?:_(\d+))?", name)
    return int(m.group(1) or 0)


def published_names(model, keras) -> dict[str, str]:
    """Keras 3 layer name -> the name the same layer has in the published file, which Keras 2 wrote with 1-based
    auto names in creation order (`conv2d_1` is the first conv2d_bn's convolution, `input_1` the input)."""
    out = {}
    for prefix in AUTO_NAMED:
        own = [l.name for l in model.layers if re.fullmatch(rf"{prefix}(_\d+)?", l.name)]
        for rank, name in enumerate(sorted(own, key=_auto_index), 1):
            out[name] = f"{prefix}_{rank}"
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            out[layer.name] = "input_1"
        out.setdefault(layer.name, layer.name)  # mixed0 ... mixed10, avg_pool, predictions: named in the source
    return out


def save_published_layout(model, path: Path, keras) -> Path:
    """The model's weights in the legacy layout of the published file: `layer_names` = every layer in model order,
    one group per layer with `weight_names` like `conv2d_1/kernel:0` in Keras' legacy (trainable, then
    non-trainable) order, one dataset per weight."""
    from harness.imageclef2024 import write_keras_h5

    rename = published_names(model, keras)
    weights = {}
    for layer in model.layers:
        own = layer.trainable_weights + layer.non_trainable_weights
        if own:
            new = rename[layer.name]
            weights[new] = [(f"{new}/{v.path.rsplit('/', 1)[-1]}:0", keras.ops.convert_to_numpy(v)) for v in own]
    return write_keras_h5(path, [rename[l.name] for l in model.layers], weights,
                          attrs={"backend": keras.backend.backend(), "keras_version": keras.__version__})


def calibrate_batchnorm(keras, model, bns: list, x: np.ndarray) -> None:
    """Set every BatchNormalization's moving_mean / moving_variance to the statistics of its own input on `x`, in
    one forward pass: each layer's `call` is wrapped to do so just before it normalises, so a layer sees inputs
    already normalised upstream (data-dependent initialisation)."""
    def wrapped(bn):
        original = bn.call

        def call(inputs, training=None, mask=None):
            v = keras.ops.convert_to_numpy(inputs).astype(np.float64)
            bn.moving_mean.assign(v.mean(axis=(0, 1, 2)).astype(np.float32))
            bn.moving_variance.assign(v.var(axis=(0, 1, 2)).astype(np.float32))
            return original(inputs, training=training, mask=mask)
        return call

    for bn in bns:
        bn.call = wrapped(bn)
    try:
        with torch.no_grad():
            model(x, training=False)
    finally:
        for bn in bns:
            del bn.call  # back to the class's method


def build_reference_model(keras, calibration: np.ndarray):
    """keras.applications.InceptionV3(weights=None) with every weight set from the fixed seed (module doc)."""
    keras.backend.clear_session()  # auto names restart at conv2d, conv2d_1, ...
    model = keras.applications.InceptionV3(weights=None)
    rng = np.random.default_rng(SEED)
    convs = sorted((l for l in model.layers if isinstance(l, keras.layers.Conv2D)), key=lambda l: _auto_index(l.name))
    bns = sorted((l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)),
                 key=lambda l: _auto_index(l.name))
    assert len(convs) == len(bns) == 94
    for conv, bn in zip(convs, bns):
        kh, kw, cin, cout = conv.kernel.shape
        conv.set_weights([rng.normal(0.0, np.sqrt(2.0 / (kh * kw * cin)), (kh, kw, cin, cout)).astype(np.float32)])
        assert not bn.scale and bn.epsilon == 1e-3  # Keras' InceptionV3: no gamma, epsilon 1e-3
        bn.set_weights([rng.normal(0.0, 0.2, cout).astype(np.float32),  # beta; the statistics are set below
                        np.zeros(cout, np.float32), np.ones(cout, np.float32)])
    calibrate_batchnorm(keras, model, bns, calibration)
    pooled = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    mu = np.asarray(pooled.predict(calibration, verbose=0), dtype=np.float64).mean(axis=0)
    kernel = rng.normal(0.0, DENSE_GAIN / np.sqrt(mu.size), (mu.size, 1000))
    model.get_layer("predictions").set_weights([kernel.astype(np.float32), (-mu @ kernel).astype(np.float32)])
    return model


@pytest.fixture(scope="module")
def reference(keras, tmp_path_factory):
    """(Keras model, its weights in the published layout)."""
    calibration = organisers_inputs(_dev_images(N_CALIBRATION, offset=N_GEN + N_REAL), keras)
    model = build_reference_model(keras, calibration)
    path = save_published_layout(model, tmp_path_factory.mktemp("keras") / "inception_v3_weights_random.h5", keras)
    return model, path


def test_written_file_has_the_published_layout_and_keras_reads_it(keras, reference):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model, path = reference
    with h5py.File(path, "r") as f:
        listed = [n.decode() for n in f.attrs["layer_names"]]
        assert len(listed) == len(model.layers) == 313 and listed[0] == "input_1"
        weighted = [n for n in listed if len(f[n].attrs["weight_names"])]
        assert sorted(weighted) == sorted([f"conv2d_{k}" for k in range(1, 95)] +
                                          [f"batch_normalization_{k}" for k in range(1, 95)] + ["predictions"])
        assert [n.decode() for n in f["conv2d_1"].attrs["weight_names"]] == ["conv2d_1/kernel:0"]
        assert f["conv2d_1/conv2d_1/kernel:0"].shape == (3, 3, 3, 32)  # HWIO
        assert [n.decode() for n in f["batch_normalization_1"].attrs["weight_names"]] == [
            "batch_normalization_1/beta:0", "batch_normalization_1/moving_mean:0",
            "batch_normalization_1/moving_variance:0"]
        assert f["predictions/predictions/kernel:0"].shape == (2048, 1000)
        # Keras loads legacy files by layer order, not by name: its own loader must rebuild the same network.
        fresh = keras.applications.InceptionV3(weights=None)
        legacy_h5_format.load_weights_from_hdf5_group(f, fresh)
    x = organisers_inputs(_dev_images(2), keras)
    assert np.array_equal(np.asarray(fresh.predict(x, verbose=0)), np.asarray(model.predict(x, verbose=0)))


def test_port_softmax_matches_keras_on_dev_images(keras, reference):
    from harness.imageclef2024 import build_network, preprocess

    model, path = reference
    paths = _dev_images(N_GEN + N_REAL)
    ref = np.asarray(model.predict(organisers_inputs(paths, keras), verbose=0), dtype=np.float64)
    # Non-degenerate: far from uniform (1e-3), and different images get different distributions.
    assert ref.max(axis=1).min() > 0.01  # every image: top class >= 10x the uniform 1e-3
    assert np.abs(ref - ref.mean(axis=0)).max() > 0.05
    assert len(set(ref.argmax(axis=1))) > 5

    net = build_network(path)
    x = torch.from_numpy(np.stack([preprocess(p) for p in paths])).permute(0, 3, 1, 2)
    with torch.no_grad():
        got = torch.softmax(net(x), dim=1).double().numpy()
    diff = np.abs(got - ref).max(axis=1)
    assert diff[:N_SOFTMAX].max() < 1e-5  # a handful of dev images (the first by name)
    # float32 only: the two compute the same graph with different op order (Keras' torch backend runs NHWC layers
    # and its own BatchNormalization arithmetic), ~1e-6 relative at the pooled features; the largest softmax
    # differences (~4e-5 measured) come from images whose logit spread is 4-5x the median.
    assert diff.max() < 1e-4


def organisers_fd(real: np.ndarray, gen: np.ndarray) -> float:
    from scipy.linalg import sqrtm

    mu1, mu2 = real.mean(axis=0), gen.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    covmean = sqrtm(s1.dot(s2))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(np.sum((mu1 - mu2) ** 2.0) + np.trace(s1 + s2 - 2.0 * covmean))


def organisers_is(probs: np.ndarray, n_split: int = 10, eps: float = 1e-16) -> tuple[float, float, float]:
    n_part = probs.shape[0] // n_split
    scores = []
    for k in range(n_split):
        part = probs[k * n_part:(k + 1) * n_part]
        p_y = np.expand_dims(np.mean(part, axis=0), 0)
        kl = part * (np.log(part + eps) - np.log(p_y + eps))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores)), float(np.std(scores)), float(np.median(scores))


def dev_image_generator(arrays: list[np.ndarray]):
    """A Generator whose prompt "k" "generates" arrays[k] (dev images, written as lossless PNGs, so both pipelines
    read the same pixels)."""
    from harness.generate import Generator

    class DevImages(Generator):
        def generate(self, prompts, seeds):
            return [arrays[int(p)] for p in prompts]

        def info(self):
            return {"family": "dev-images"}

    return DevImages()


def test_2024_metric_matches_the_organisers_pipeline_run_with_keras(keras, reference, tmp_path, monkeypatch):
    import shutil

    from harness.generate import generate_images
    from harness.runs import create_run
    from harness.score import ScoreConfig, score_run

    model, path = reference
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    gen_sources = _dev_images(N_GEN)
    run = create_run("test-pattern", {"note": "dev images as generated images"})
    generate_images(dev_image_generator([organisers_read(p) for p in gen_sources]), [str(i) for i in range(N_GEN)],
                    run.images_dir)
    real = tmp_path / "real"
    real.mkdir()
    for p in _dev_images(N_REAL, offset=N_GEN):
        shutil.copy(p, real / p.name)

    cfg = ScoreConfig(real=str(real), metrics=["imageclef2024"], imageclef_weights=path, device="cpu",
                      allow_unverified_weights=True)
    got = score_run(run, cfg).metrics["imageclef2024"]
    assert got["status"] == "ok" and got["n_gen"] == N_GEN and got["n_real"] == N_REAL

    # The organisers' pipeline, with Keras: list (case-sensitive suffixes), read, resize quirk, preprocess, predict.
    def listing(folder: Path) -> list[Path]:
        return [folder / n for n in sorted(os.listdir(folder)) if n.endswith(("png", "jpg", "jpeg"))]

    gen_files, real_files = listing(run.images_dir), listing(real)
    assert len(gen_files) == N_GEN and len(real_files) == N_REAL
    act_gen = np.asarray(model.predict(organisers_inputs(gen_files, keras), verbose=0))
    act_real = np.asarray(model.predict(organisers_inputs(real_files, keras), verbose=0))
    fd = organisers_fd(act_real, act_gen)
    is_mean, is_std, is_median = organisers_is(act_gen)

    assert fd > 0.05 and is_mean > 1.5  # a non-trivial value to compare
    assert got["fd"] == pytest.approx(fd, rel=1e-4)
    assert got["is_mean"] == pytest.approx(is_mean, rel=1e-4)
    assert got["is_median"] == pytest.approx(is_median, rel=1e-4)
    assert got["is_std"] == pytest.approx(is_std, rel=1e-3, abs=1e-6)
