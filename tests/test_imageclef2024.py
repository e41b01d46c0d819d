"""The organisers' 2024 evaluator, step by step, against direct numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness import imageclef2024 as ic
from harness.errors import UserError

FLAT = 299 * 299 * 3


def numpy_reference(arr: np.ndarray) -> np.ndarray:
    """numpy.resize's documented semantics written out: the C-order sequence, cycled to 299*299*3 values."""
    flat = arr.reshape(-1)
    out = flat[np.arange(FLAT) % flat.size].reshape(299, 299, 3)
    return out.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _save(path, arr, mode=None):
    Image.fromarray(arr, mode).save(path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_listing_rule_is_the_evaluators(tmp_path):
    for name in ("a.png", "b.jpg", "c.jpeg", "D.PNG", "e.JPG", "notpng", "f.txt", "g.gif", "manifest.csv"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(b"x")
    assert [p.name for p in ic.list_images(tmp_path)] == ["a.png", "b.jpg", "c.jpeg", "notpng"]
    with pytest.raises(UserError, match="not found"):
        ic.list_images(tmp_path / "nope")


def test_read_like_skimage_keeps_the_files_own_mode(tmp_path, rng):
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (7, 9, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    assert np.array_equal(ic.read_like_skimage(_save(tmp_path / "rgb.png", rgb)), rgb)
    assert np.array_equal(ic.read_like_skimage(_save(tmp_path / "rgba.png", rgba, "RGBA")), rgba)  # alpha kept
    assert np.array_equal(ic.read_like_skimage(_save(tmp_path / "g.png", grey, "L")), grey)  # not expanded
    pal = Image.fromarray(rgb).quantize(8)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(ic.read_like_skimage(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    _save(tmp_path / "j.jpg", rgb)
    with Image.open(tmp_path / "j.jpg") as im:
        assert np.array_equal(ic.read_like_skimage(tmp_path / "j.jpg"), np.asarray(im))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        ic.read_like_skimage(tmp_path / "bad.png")


@pytest.mark.parametrize("shape,mode", [
    ((350, 420, 3), None),  # larger than 299, non-square
    ((120, 80, 3), None),  # smaller than 299: the sequence repeats
    ((299, 299, 3), None),
    ((310, 330, 4), "RGBA"),  # channels slide
    ((50, 60, 4), "RGBA"),
    ((64, 48), "L"),
])
def test_preprocessing_matches_numpy(tmp_path, rng, shape, mode):
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    path = _save(tmp_path / "x.png", arr, mode)
    out = ic.preprocess(path)
    assert out.dtype == np.float32 and out.shape == (299, 299, 3)
    assert np.array_equal(out, numpy_reference(arr))
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_numpy_resize_quirk_semantics(rng):
    big = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    r = ic.organisers_resize(big)
    assert np.array_equal(r[0], big[0, :299])  # first output row = first 299 pixels of the top row
    assert np.array_equal(r[1, :201], big[0, 299:])  # then the rest of that row, re-wrapped
    assert np.array_equal(r[1, 201:], big[1, :98])
    small = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    assert np.array_equal(ic.organisers_resize(small)[0, 100:200], small.reshape(-1, 3)[np.arange(100, 200) % 100])
    rgba = rng.integers(0, 256, (300, 300, 4), dtype=np.uint8)
    r = ic.organisers_resize(rgba)
    assert r[0, 1, 0] == rgba[0, 0, 3]  # pixel 0's alpha became pixel 1's red
    grey = rng.integers(0, 256, (300, 300), dtype=np.uint8)
    assert np.array_equal(ic.organisers_resize(grey)[0, 0], grey[0, :3])  # 3 grey pixels make one RGB pixel


def _probs(rng, n, k, temp=1.0):
    logits = rng.normal(size=(n, k)) * temp
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_frechet_distance_matches_an_eigenvalue_reference(rng):
    a, b = _probs(rng, 300, 12), _probs(rng, 250, 12, temp=2.0)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    ref = ((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert ic.frechet_distance(a, b) == pytest.approx(ref, rel=1e-5)
    assert abs(ic.frechet_distance(a, a)) < 1e-6
    one_hot = np.eye(12, dtype=np.float32)[rng.integers(0, 12, 200)]
    assert 0 <= ic.frechet_distance(one_hot, np.full((50, 12), 1 / 12, np.float32)) <= 4
    with pytest.raises(ValueError):
        ic.frechet_distance(a[:1], b)


def test_inception_score_matches_a_per_row_kl_reference(rng):
    from scipy.stats import entropy

    p = _probs(rng, 57, 30, temp=3.0)  # 57 -> 10 splits of 5, the last 7 images dropped
    got = ic.inception_score(p)
    ref = []
    for i in range(10):
        chunk = p[i * 5:(i + 1) * 5].astype(np.float64)
        py = chunk.mean(axis=0)
        ref.append(np.exp(np.mean([entropy(row, py) for row in chunk])))
    assert got["splits"] == pytest.approx(ref, rel=1e-5)
    assert got["mean"] == pytest.approx(np.mean(ref), rel=1e-5)
    assert got["std"] == pytest.approx(np.std(ref), rel=1e-4)
    assert got["median"] == pytest.approx(np.median(ref), rel=1e-5)
    assert ic.inception_score(p[:50])["splits"] == got["splits"]
    # Known values: identical predictions -> 1; one-hot over 5 classes per split -> 5 (eps keeps log(0) finite).
    assert ic.inception_score(np.full((20, 8), 1 / 8, np.float32))["mean"] == pytest.approx(1.0)
    assert ic.inception_score(np.eye(5, dtype=np.float32)[np.arange(50) % 5])["mean"] == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 10"):
        ic.inception_score(p[:9])


@pytest.fixture(scope="module")
def clef_weights(tmp_path_factory):
    from harness.features import write_random_weights

    return write_random_weights("imageclef2024", tmp_path_factory.mktemp("w") / "inception_v3.pth", seed=3)


def test_network_features_equal_a_direct_pass_of_the_port(tmp_path, rng, clef_weights):
    from harness.features import ResolvedWeights

    paths = [_save(tmp_path / f"{i}.png", rng.integers(0, 256, (80 + 40 * i, 100, 3), dtype=np.uint8))
             for i in range(3)]
    paths.append(_save(tmp_path / "rgba.png", rng.integers(0, 256, (90, 90, 4), dtype=np.uint8), "RGBA"))
    ex = ic.OrganisersInception(ResolvedWeights(clef_weights, "x", False, "explicit"), torch.device("cpu"))
    got = ex.forward(torch.stack([ex.load(p) for p in paths]))["softmax"]

    net = ic.inception_v3_port(aux_logits=True)
    net.load_state_dict(torch.load(clef_weights, weights_only=True))
    net.eval()
    x = np.stack([numpy_reference(np.asarray(Image.open(p))) for p in paths])  # NHWC, like Keras
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(x).permute(0, 3, 1, 2)), dim=1)
    assert got.shape == (4, 1000) and torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.sum(1), torch.ones(4), atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 0  # random weights still separate images

    with pytest.raises(UserError, match="neither Keras HDF5 weights nor a torchvision InceptionV3"):
        ic.build_network(paths[0])


def test_score_run_computes_the_2024_metric_and_labels_it(tmp_path, monkeypatch, clef_weights):
    from harness.generate import TestPatternGenerator, generate_images
    from harness.runs import create_run
    from harness.score import ScoreConfig, score_run

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 48})
    generate_images(TestPatternGenerator(48), [f"p{i % 3}" for i in range(10)], run.images_dir)
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(48), [f"q{i % 4}" for i in range(6)], real, base_seed=1)
    cfg = ScoreConfig(real=str(real), metrics=["imageclef2024"], imageclef_weights=clef_weights, device="cpu",
                      allow_unverified_weights=True)
    m = score_run(run, cfg).metrics["imageclef2024"]
    assert m["status"] == "ok" and "approximates the official" in m["label"]
    assert m["n_gen"] == 10 and m["n_real"] == 6 and len(m["is_splits"]) == 10
    assert 0 <= m["fd"] <= 4 and m["is_mean"] >= 1.0 - 1e-6
    assert m["is_median"] == pytest.approx(float(np.median(m["is_splits"])))


def test_sets_empty_under_the_organisers_listing_are_not_computed(tmp_path, monkeypatch, clef_weights):
    from harness.generate import TestPatternGenerator, generate_images
    from harness.runs import create_run
    from harness.score import ScoreConfig, score_run

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 16})
    generate_images(TestPatternGenerator(16), [f"p{i}" for i in range(10)], run.images_dir)
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):  # torch-fidelity's rule takes upper-case extensions, the organisers' does not
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(real / f"R{i}.PNG")
    cfg = ScoreConfig(real=str(real), metrics=["imageclef2024"], imageclef_weights=clef_weights, device="cpu",
                      allow_unverified_weights=True)
    m = score_run(run, cfg).metrics["imageclef2024"]
    assert m["status"] == "not computed" and "listing rule" in m["reason"] and "fd" not in m


# ------------------------------------------------------------------------------- the Keras port and its weights


def test_keras_avg_pool_does_not_count_padding():
    ones = torch.ones(1, 2, 5, 6)
    assert torch.equal(ic.keras_avg_pool(ones), ones)  # Keras 'same' pooling of a constant is that constant
    tv = torch.nn.functional.avg_pool2d(ones, kernel_size=3, stride=1, padding=1)  # torchvision's blocks
    assert tv[0, 0, 0, 0] == pytest.approx(4 / 9) and tv[0, 0, 0, 2] == pytest.approx(6 / 9)
    x = torch.rand(1, 1, 4, 4)
    assert ic.keras_avg_pool(x)[0, 0, 0, 0] == pytest.approx(x[0, 0, :2, :2].mean().item())


@pytest.fixture(scope="module")
def port_and_torchvision(clef_weights):
    from torchvision.models import inception_v3

    tv = inception_v3(weights=None, aux_logits=True, transform_input=False, init_weights=False).eval()
    tv.load_state_dict(torch.load(clef_weights, weights_only=True))
    return ic.build_network(clef_weights), tv


@pytest.mark.parametrize("block", ["Mixed_5b", "Mixed_6b", "Mixed_7b", "Mixed_7c"])
def test_port_pools_like_keras_at_the_borders(port_and_torchvision, block):
    """The network `build_network` returns averages only in-image pixels in its pool branches (Keras), where
    torchvision's block with the same weights counts the padded zeros: same interior, different border."""
    port, tv = port_and_torchvision
    mine, theirs = getattr(port, block), getattr(tv, block)
    cin = mine.branch_pool.conv.in_channels
    x = torch.rand(1, cin, 7, 7, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        got, ref = mine(x), theirs(x)
        pool = mine.branch_pool(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    k = mine.branch_pool.conv.out_channels
    assert torch.allclose(got[:, -k:], pool, atol=1e-6)  # the pool branch is Keras' pooling then the 1x1 conv
    assert torch.allclose(got[:, :-k], ref[:, :-k], atol=1e-6)  # the other branches are torchvision's
    assert torch.allclose(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5)  # interior unchanged
    border = (got - ref)[:, -k:].abs()
    assert border[..., 0, :].max() > 1e-3 and border[..., :, -1].max() > 1e-3


def keras_layout_of(model: torch.nn.Module) -> tuple[list[str], dict]:
    """The port's weights as Keras' InceptionV3 stores them in the published file (inverse of the loader)."""
    mods = dict(model.named_modules())
    names: list[str] = ["input_1"]
    weights: dict = {}
    for k, conv_name in enumerate(ic.KERAS_CONV_ORDER, 1):
        block = mods[conv_name]
        names += [f"conv2d_{k}", f"batch_normalization_{k}", f"activation_{k}"]
        weights[f"conv2d_{k}"] = [(f"conv2d_{k}/kernel:0", block.conv.weight.numpy().transpose(2, 3, 1, 0))]
        bn = block.bn
        weights[f"batch_normalization_{k}"] = [
            (f"batch_normalization_{k}/{role}:0", t.numpy())
            for role, t in (("beta", bn.bias), ("moving_mean", bn.running_mean), ("moving_variance", bn.running_var))]
    names += ["mixed10", "avg_pool", "predictions"]
    weights["predictions"] = [("predictions/kernel:0", model.fc.weight.numpy().T),
                              ("predictions/bias:0", model.fc.bias.numpy())]
    return names, weights


@pytest.fixture(scope="module")
def keras_port_and_file(tmp_path_factory, clef_weights):
    pytest.importorskip("h5py")
    model = ic.build_network(clef_weights)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct BN statistics and betas, so a statistic in the wrong slot shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    names, weights = keras_layout_of(model)
    path = ic.write_keras_h5(tmp_path_factory.mktemp("keras") / ic.KERAS_H5_NAME, names, weights)
    return model, path


def test_keras_h5_loads_onto_the_port_exactly(keras_port_and_file, rng):
    model, path = keras_port_and_file
    assert ic.weights_kind(path) == "keras-h5" and ic.label_for(path) == ic.LABEL_KERAS
    assert not ic.keras_h5_is_published(path)
    net = ic.build_network(path)
    assert not hasattr(net, "AuxLogits") or net.AuxLogits is None  # Keras' model has no auxiliary head
    ref = {k: v for k, v in model.state_dict().items() if not k.startswith("AuxLogits")}
    got = net.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in got if not k.endswith("bn.weight"))
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in got.items() if k.endswith("bn.weight"))  # scale=False
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))  # Keras' epsilon
    x = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 299, 299)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


def _broken_copy(src, dst, edit):
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _misshape(f):
    del f["batch_normalization_5/batch_normalization_5/beta:0"]
    f["batch_normalization_5"].create_dataset("batch_normalization_5/beta:0", data=np.zeros(7, np.float32))


def _extra_layer(f):
    f.attrs["layer_names"] = np.append(f.attrs["layer_names"], np.bytes_("dense_9"))
    g = f.create_group("dense_9")
    g.attrs["weight_names"] = np.asarray([b"dense_9/kernel:0"])
    g.create_dataset("dense_9/kernel:0", data=np.zeros((3, 3), np.float32))


@pytest.mark.parametrize("edit,message", [
    (lambda f: f.__delitem__("conv2d_17"), "layer conv2d_17 is missing"),
    (lambda f: f.__delitem__("predictions"), "layer predictions is missing"),  # the _notop file
    (_misshape, r"layer batch_normalization_5: weight beta has shape \(7,\), Keras' InceptionV3 has \(192,\)"),
    (lambda f: f["conv2d_3"].attrs.__setitem__("weight_names", np.asarray([b"conv2d_3/kernel:0",
                                                                           b"conv2d_3/bias:0"])),
     "layer conv2d_3 has an unexpected weight 'conv2d_3/bias:0'"),
    (_extra_layer, "layer dense_9 carries weights"),
    (lambda f: f.attrs.__delitem__("layer_names"), "no 'layer_names' attribute"),
])
def test_keras_h5_loader_refuses_a_wrong_file_in_one_line(keras_port_and_file, tmp_path, edit, message):
    _, good = keras_port_and_file
    bad = _broken_copy(good, tmp_path / "weights.h5", edit)
    with pytest.raises(UserError, match=message) as e:
        ic.build_network(bad)
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)


def test_weights_kind_reads_the_file_not_its_name(tmp_path, keras_port_and_file, clef_weights):
    import shutil

    _, h5 = keras_port_and_file
    disguised = tmp_path / "weights.pth"
    shutil.copy(h5, disguised)
    assert ic.weights_kind(disguised) == "keras-h5"
    renamed = tmp_path / "weights.h5"
    shutil.copy(clef_weights, renamed)
    assert ic.weights_kind(renamed) == "torchvision" and ic.label_for(renamed) == ic.LABEL
    assert isinstance(ic.build_network(renamed), torch.nn.Module)


def test_score_run_takes_keras_h5_weights(tmp_path, monkeypatch, keras_port_and_file):
    """The same option and path score with Keras' file: the weights file itself selects the loader."""
    from harness.generate import TestPatternGenerator, generate_images
    from harness.runs import create_run
    from harness.score import ScoreConfig, score_run

    _, h5 = keras_port_and_file
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    run = create_run("test-pattern", {"size": 32})
    generate_images(TestPatternGenerator(32), [f"p{i % 3}" for i in range(10)], run.images_dir)
    real = tmp_path / "real"
    generate_images(TestPatternGenerator(32), [f"q{i % 4}" for i in range(4)], real, base_seed=1)
    cfg = ScoreConfig(real=str(real), metrics=["imageclef2024"], imageclef_weights=h5, device="cpu",
                      allow_unverified_weights=True)
    result = score_run(run, cfg)
    m = result.metrics["imageclef2024"]
    assert m["status"] == "ok" and 0 <= m["fd"] <= 4 and m["is_mean"] >= 1.0 - 1e-6
    assert result.data["extractors"]["imageclef2024"]["weights"]["path"] == str(h5.resolve())
