"""Every user or environment error is one line with exit status 2, names the option or file and the fix, and
is raised before anything is trained (the training functions are patched to fail, the cache stays empty)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import manifex.models.known_manifold as known_manifold
import manifex.models.zoo as zoo
from manifex.cli import main
from manifex.data.loaders import check_classification_data, load_digits8
from manifex.errors import DataError
from manifex.models import ModelCache

ATTACK = ["attack", "--dataset", "digits8", "--pairs", "2", "--iterations", "2", "--epochs", "1", "--quiet"]
SMOOTH = ["smooth", "--dataset", "digits8", "--pairs", "2", "--iterations", "2", "--epochs", "1", "--quiet"]
CONCEPTS = ["concepts", "--dataset", "digits8", "--epochs", "1", "--classes", "0,1", "--quiet"]
CONTRAST = ["contrast", "--dataset", "digits8", "--epochs", "1", "--class-pairs", "0:1", "--quiet"]
COUNTERFACTUAL = ["counterfactual", "--dataset", "digits8", "--n", "2", "--max-steps", "2", "--epochs", "1", "--quiet"]
ALIGN = ["align", "--dataset", "known:digits8", "--samples", "8", "--n-train", "50", "--n-test", "16",
         "--vae-epochs", "1", "--epochs", "1", "--methods", "gradient", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    """Any training fails the test: the error must come before it."""

    def trained(*args, **kwargs):
        raise AssertionError("a model was trained before the error")

    monkeypatch.setattr(zoo, "fit_classifier", trained)
    monkeypatch.setattr(zoo, "fit_generative", trained)


def run(args, tmp_path, *, out=True, cache=True):
    extra = (["--out", str(tmp_path / "out")] if out else []) + (["--cache-dir", str(tmp_path / "cache")] if cache else [])
    return CliRunner().invoke(main, [*args, *extra])


def assert_one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_nothing_cached(tmp_path):
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.suffix == ".pt" for p in cache.iterdir())


# ---------------------------------------------------------------------------------------------- option values
@pytest.mark.parametrize("budget, needle", [("8/0", "8/0"), ("-1/255", "-1/255"), ("nan", "nan"), ("0", "> 0")])
@pytest.mark.parametrize("command", [ATTACK, SMOOTH])
def test_bad_budget_is_refused_before_training(command, budget, needle, tmp_path, no_training):
    res = run([*command, "--budget", budget], tmp_path)
    assert_one_line_error(res, "--budget", needle, "8/255")
    assert_nothing_cached(tmp_path)


@pytest.mark.parametrize("eps, needle", [("abc", "'abc'"), ("-1", "> 0"), ("0.5,0", "> 0"), ("inf", "finite")])
def test_bad_robust_eps_is_refused(eps, needle, tmp_path, no_training):
    res = run([*ALIGN, f"--robust-eps={eps}"], tmp_path)
    assert_one_line_error(res, "--robust-eps", needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", [ATTACK, SMOOTH, ALIGN])
def test_cuda_without_cuda_is_refused(command, tmp_path, no_training):
    res = run([*command, "--device", "cuda"], tmp_path)
    assert_one_line_error(res, "--device cuda", "CUDA is not available", "--device cpu")


@pytest.mark.parametrize("device, needle", [("foo", "not a torch device"), ("cuda:99", "cuda"), ("meta", "not meta")])
def test_bad_device_is_refused(device, needle, tmp_path, no_training):
    res = run([*ATTACK, "--device", device], tmp_path)
    assert_one_line_error(res, f"--device {device}", needle)


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
@pytest.mark.parametrize("command", [ATTACK, SMOOTH, ALIGN])
def test_unwritable_dirs_are_refused_before_training(command, option, tmp_path, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [*command, option, str(blocker / "sub")]
    other = "--cache-dir" if option == "--out" else "--out"
    res = CliRunner().invoke(main, [*args, other, str(tmp_path / "ok")])
    assert_one_line_error(res, option, str(blocker / "sub"), "writable")


def test_too_many_pairs_names_the_option(tmp_path, no_training):
    res = run([*ATTACK, "--pairs", "100000"], tmp_path)
    assert_one_line_error(res, "--pairs", "100000", "or fewer")


# ---------------------------------------------------------------------------------------------- data
def _npz(path, x, y):
    np.savez(path, x=x, y=y)
    return str(path)


def test_npz_without_images_is_refused(tmp_path, no_training):
    path = _npz(tmp_path / "empty.npz", np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64))
    for command in (ATTACK, SMOOTH):
        res = run([*command[:1], "--dataset", path, *command[3:]], tmp_path)
        assert_one_line_error(res, "empty.npz", "0 images")
    res = run([*ALIGN[:1], "--dataset", f"known:{path}", *ALIGN[3:]], tmp_path)
    assert_one_line_error(res, "empty.npz", "0 images")
    assert_nothing_cached(tmp_path)


def test_labels_with_gaps_need_num_classes(tmp_path, no_training):
    d = load_digits8()
    y = d.y.numpy().copy()
    y[:3] = 57
    path = _npz(tmp_path / "gaps.npz", (d.x.numpy()[:, 0] * 255).astype(np.uint8), y)
    res = run(["attack", "--dataset", path, *ATTACK[3:]], tmp_path)
    assert_one_line_error(res, "gaps.npz", "0..9, 57", "--num-classes 58", "np.unique")
    assert_nothing_cached(tmp_path)


def test_num_classes_makes_room_for_unused_labels():
    d = load_digits8()
    d.y[:3] = 57
    d.classes = [str(i) for i in range(58)]
    with pytest.raises(DataError, match="num_classes=58"):  # in Python; the CLI says --num-classes 58 (above)
        check_classification_data(d)
    checks = check_classification_data(d, num_classes=58)
    assert d.num_classes == 58 and "11 of 58 classes present" in checks[1]
    with pytest.raises(DataError, match="up to 57"):
        check_classification_data(d, num_classes=40)


def test_one_class_dataset_is_refused_before_training(tmp_path, no_training):
    path = _npz(tmp_path / "one.npz", np.zeros((20, 8, 8), np.uint8), np.full(20, 3))
    for command in (ATTACK, SMOOTH):
        res = run([command[0], "--dataset", path, *command[3:]], tmp_path)
        assert_one_line_error(res, "one.npz", "label 3", "two classes")
    res = run([*ALIGN[:1], "--dataset", f"known:{path}", *ALIGN[3:]], tmp_path)
    assert_one_line_error(res, "one.npz", "two classes")
    for command in (COUNTERFACTUAL, CONCEPTS, CONTRAST):  # counterfactual ran no data check before
        res = run([command[0], "--dataset", path, *command[3:]], tmp_path)
        assert_one_line_error(res, "one.npz", "two classes")
    assert_nothing_cached(tmp_path)


def test_counterfactual_classes_are_checked_before_the_known_manifold_is_built(tmp_path, no_training):
    """--target 10 on known:digits8 failed after 117 s of building the known manifold (a VAE, a labeler,
    sampling); the classes of <data> are known before."""
    res = run([*COUNTERFACTUAL[:1], "--dataset", "known:digits8", "--target", "10", *COUNTERFACTUAL[3:]], tmp_path)
    assert_one_line_error(res, "--target 10 is not a class of known:digits8", "0..9")
    assert_nothing_cached(tmp_path)


def test_too_many_samples_are_clamped_and_said(tmp_path, monkeypatch):
    """--samples beyond the test set is announced before any training (here the run then stops at the first
    training step, patched to fail with a manifex error)."""
    from manifex.errors import ModelError

    def stop(*a, **k):
        raise ModelError("stopped here")

    monkeypatch.setattr(zoo, "fit_generative", stop)
    res = run([*ALIGN, "--samples", "100000"], tmp_path)
    assert res.exit_code == 2 and "stopped here" in res.output
    assert "--samples 100000 is more than the 16 test images; scoring all 16" in res.output


# ---------------------------------------------------------------------------------------------- cache files
def test_cache_file_with_wrong_content_names_the_file(tmp_path, monkeypatch):
    cache = ModelCache(tmp_path / "cache")
    cache.save("classifier-lenet", "k", {"weights": torch.zeros(3)})  # a valid archive with the wrong content
    bad = cache.path("classifier-lenet", "k")
    with pytest.raises(DataError, match="delete it to retrain"):
        cache.load("classifier-lenet", "k")
    # from the CLI, with every cache entry resolving to that file
    monkeypatch.setattr(ModelCache, "path", lambda self, name, key, partial=False: bad)
    res = run(ATTACK, tmp_path)
    assert_one_line_error(res, str(bad), "delete it to retrain")


def test_other_os_errors_are_one_line(tmp_path, monkeypatch):
    import manifex.experiment.contract as contract

    def broken(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(contract, "resolve_data", broken)  # attack loads its data through the experiment contract
    res = run(ATTACK, tmp_path)
    assert_one_line_error(res, "Permission denied", str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------- degenerate data
@pytest.mark.slow
def test_degenerate_known_manifold_is_refused_before_sampling(tmp_path, monkeypatch):
    """A labeler at chance stops the run right after the labeler is trained: no sampling, no classifier."""
    monkeypatch.setattr(known_manifold, "accuracy", lambda model, data, *a, **k: 0.08)
    monkeypatch.setattr(known_manifold, "_sample", lambda *a, **k: pytest.fail("sampled a degenerate dataset"))
    res = run([*ALIGN, "--vae-epochs", "1"], tmp_path)
    assert_one_line_error(res, "degenerate", "8.0%", "chance (10.0%)", "--vae-epochs", "--allow-degenerate")
    assert not (tmp_path / "out" / "report.html").exists()



@pytest.mark.parametrize("args, needles", [
    ([*CONCEPTS, "--layer", "blocks.9"], ["unknown layer 'blocks.9'", "blocks.0"]),
    ([*CONCEPTS, "--layer", "blocks.1", "--pool", "16"], ["pool 16 is larger than"]),
    ([*CONTRAST, "--layer", "blocks.9"], ["unknown layer 'blocks.9'"]),
])
def test_layer_and_pool_are_checked_on_the_untrained_network_before_training(tmp_path, no_training, args, needles):
    """A built-in classifier's layers are known before it is trained: a wrong --layer or a --pool larger than
    the layer's grid is refused first (it used to train the classifier, 18 min on MNIST-5k, and then fail)."""
    res = run(args, tmp_path)
    assert_one_line_error(res, *needles)
    assert not list((tmp_path / "cache").glob("*.pt"))
