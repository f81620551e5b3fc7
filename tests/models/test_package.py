"""Model packages: round trip, hash, determinism, and every way a package can be wrong."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gastrolens.cli import models_cmd
from gastrolens.errors import ModelPackageError
from gastrolens.models.package import (
    CARD_FILE,
    WEIGHTS_FILE,
    ClassifierCard,
    ModelCard,
    ModelPackage,
    build_package,
    load_package,
    read_card,
    save_package,
    untrained_package,
)

UNTRAINED_SHA256_TORCH_2_14 = "d7f876319db3549879747168b4659f7bf61a8637c97bd76a83557f464dfdd682"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, _tiny_package: ModelPackage) -> Path:
    folder = tmp_path_factory.mktemp("package") / "tiny"
    package = ModelPackage(
        _tiny_package.card.model_copy(
            update={"training": {"epochs": 0, "note": "test"}, "metrics": {"segmentation_iou": 0.0}}
        ),
        _tiny_package.classifier,
        _tiny_package.segmenter,
    )
    save_package(package, folder)
    return folder


@pytest.fixture
def copy_of(saved: Path, tmp_path: Path) -> Path:
    """A copy of the saved package whose weights file is a link to the original (cheap).

    Tests that change the weights replace the link with a new file.
    """
    target = tmp_path / "copy"
    target.mkdir()
    shutil.copy(saved / CARD_FILE, target / CARD_FILE)
    (target / WEIGHTS_FILE).symlink_to(saved / WEIGHTS_FILE)
    return target


def _edit_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / CARD_FILE).read_text())
    card.update(changes)
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_round_trip_keeps_card_hash_and_weights(saved: Path, _tiny_package: ModelPackage) -> None:
    raw = json.loads((saved / CARD_FILE).read_text())
    for key in ("name", "version", "classes", "preprocessing", "classifier", "segmenter", "decision"):
        assert key in raw
    for key in ("training", "metrics", "created", "weights_sha256"):
        assert key in raw
    assert raw["classes"] == ["normal", "pu", "egc_hgin", "agc", "smt"]
    assert raw["classifier"]["input_size"] == 64 and raw["segmenter"]["input_size"] == 65
    assert raw["segmenter"]["output_stride"] == 16
    assert raw["preprocessing"]["normalisation"]["mean"] == [0.34403, 0.18075, 0.13959]
    assert raw["weights_sha256"] == hashlib.sha256((saved / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert raw["weights_sha256"] == _tiny_package.card.weights_sha256
    assert read_card(saved).preset("segmenter").size == 65
    assert not read_card(saved).preset("classifier", fov_crop=False).fov_crop

    loaded = load_package(saved)
    assert loaded.card.training == {"epochs": 0, "note": "test"}
    assert loaded.identity == _tiny_package.identity
    for name in ("classifier", "segmenter"):
        original = getattr(_tiny_package, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, original[key]), key


def test_untrained_weights_are_deterministic(_tiny_package: ModelPackage) -> None:
    state = torch.random.get_rng_state()
    again = untrained_package(output_stride=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.card.weights_sha256 == _tiny_package.card.weights_sha256
    assert again.identity.name == "gastrolens-untrained" and again.identity.untrained
    if torch.__version__.startswith("2.14."):
        assert again.card.weights_sha256 == UNTRAINED_SHA256_TORCH_2_14


def test_each_network_is_marked_trained_or_not(_tiny_package: ModelPackage) -> None:
    card = ModelCard(name="half", version="1", classifier=ClassifierCard(trained=True, initialisation="imagenet"))
    package = build_package(card, _tiny_package.classifier, _tiny_package.segmenter)
    assert package.untrained and package.card.untrained_networks == ("segmenter",)
    assert package.identity.untrained
    both = card.model_copy(update={"segmenter": card.segmenter.model_copy(update={"trained": True})})
    assert not build_package(both, _tiny_package.classifier, _tiny_package.segmenter).identity.untrained


def test_tampered_weights_are_refused(copy_of: Path) -> None:
    weights = copy_of / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.unlink()
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="sha256 is .* but the card says"):
        load_package(copy_of)


@pytest.mark.parametrize(("missing", "message"),
                         [(WEIGHTS_FILE, "missing weights.safetensors"), (CARD_FILE, "missing model.json")])
def test_missing_files_are_named(copy_of: Path, missing: str, message: str) -> None:
    (copy_of / missing).unlink()
    with pytest.raises(ModelPackageError, match=message):
        load_package(copy_of)


def test_not_a_package(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="does not exist"):
        load_package(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelPackageError, match="not a folder"):
        load_package(tmp_path / "file")


def test_card_errors_name_what_differs(copy_of: Path) -> None:
    (copy_of / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelPackageError, match="not a readable JSON"):
        read_card(copy_of)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"classes": ["normal", "pu", "agc", "egc_hgin", "smt"]}, "classes .* differ"),
        ({"classes": ["normal", "pu"]}, "classes .* differ"),
        ({"classifier": {"architecture": "resnet50", "input_size": 64}}, "classifier architecture 'resnet50' differs"),
        ({"segmenter": {"architecture": "deeplabv3_resnet101"}}, "segmenter architecture 'deeplabv3_resnet101'"),
        ({"segmenter": {"output_stride": 32}}, "output_stride 32"),
        ({"format_version": 99}, "format_version 99"),
        ({"decision": {"lesion_threshold": 2}}, "decision.lesion_threshold"),
        ({"weights_file": "../elsewhere.safetensors"}, "must be a file name"),
    ],
)
def test_bad_cards(copy_of: Path, changes: dict[str, object], message: str) -> None:
    _edit_card(copy_of, **changes)
    with pytest.raises(ModelPackageError, match=message):
        load_package(copy_of)


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = safetensors.torch.save(tensors)
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).write_bytes(data)
    _edit_card(folder, weights_sha256=hashlib.sha256(data).hexdigest())


def test_nan_weights_are_refused(copy_of: Path) -> None:
    tensors = dict(safetensors.torch.load((copy_of / WEIGHTS_FILE).read_bytes()))
    tensors["segmenter.backbone.layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    _rewrite_weights(copy_of, tensors)
    with pytest.raises(ModelPackageError, match="layer2.0.conv1.weight holds NaN"):
        load_package(copy_of)


def test_weights_of_another_architecture_are_refused(copy_of: Path) -> None:
    tensors = safetensors.torch.load((copy_of / WEIGHTS_FILE).read_bytes())
    tensors["classifier.fc.weight"] = torch.zeros(1000, 512)
    tensors["classifier.fc.bias"] = torch.zeros(1000)
    _rewrite_weights(copy_of, tensors)
    with pytest.raises(ModelPackageError, match=r"classifier: tensor fc.bias has shape \(1000,\)"):
        load_package(copy_of)
    del tensors["classifier.fc.bias"]
    _rewrite_weights(copy_of, tensors)
    with pytest.raises(ModelPackageError, match=r"missing \['fc.bias'\]"):
        load_package(copy_of)


def test_garbage_weights_file(copy_of: Path) -> None:
    (copy_of / WEIGHTS_FILE).unlink()
    (copy_of / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    _edit_card(copy_of, weights_sha256=hashlib.sha256(b"\x00" * 64).hexdigest())
    with pytest.raises(ModelPackageError, match="not a safetensors file"):
        load_package(copy_of)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    models_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_info_prints_the_card(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(["models", "info", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["name"] == "gastrolens-untrained"
    assert "verified" in err and "UNTRAINED: classifier, segmenter" in err
    assert _cli(["models", "info", "--no-verify", str(saved)]) == 0


def test_cli_info_on_a_bad_package(copy_of: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (copy_of / WEIGHTS_FILE).unlink()
    assert _cli(["models", "info", str(copy_of)]) == 2
    assert "missing weights.safetensors" in capsys.readouterr().err
