"""A fixed seed reproduces a run; --resume continues an interrupted run to the same weights;
a package with an untrained network says so in its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gastrolens import UNTRAINED_WARNING
from gastrolens.errors import ModelError
from gastrolens.models import read_card
from gastrolens.training import trainer
from gastrolens.training.evaluate import evaluate
from gastrolens.training.manifest import Manifest, read_manifest
from gastrolens.training.recipe import Recipe
from gastrolens.training.report import write_report
from gastrolens.training.synthetic import write_dataset

RECIPE = Recipe(task="classifier", epochs=2, batch_size=8, learning_rate=0.01, image_size=32, precise_bn_batches=2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    folder = tmp_path_factory.mktemp("repro")
    return read_manifest(write_dataset(folder / "data", lesions_per_class=2, rows=48, cols=56, test_fraction=0.0))


class Interrupted(Exception):
    pass


def test_a_seed_reproduces_a_run_and_resume_continues_it(
    manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = trainer.train(RECIPE, manifest, tmp_path / "straight", device="cpu", progress=False)

    save = trainer.save_checkpoint

    def save_then_stop(*args: object, **kwargs: object) -> None:
        save(*args, **kwargs)  # type: ignore[arg-type]
        raise Interrupted  # as if the machine went down right after epoch 1's checkpoint

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        trainer.train(RECIPE, manifest, tmp_path / "resumed", device="cpu", progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert not (tmp_path / "resumed" / "model.json").exists()
    resumed = trainer.train(RECIPE, manifest, tmp_path / "resumed", device="cpu", progress=False, resume=True)

    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.package.card.weights_sha256 == straight.package.card.weights_sha256
    assert resumed.history[1]["train_loss"] == straight.history[1]["train_loss"]

    other_seed = trainer.train(RECIPE.with_changes(seed=1, epochs=1), manifest, tmp_path / "seed1", device="cpu",
                               progress=False)
    assert other_seed.package.card.weights_sha256 != straight.package.card.weights_sha256


def test_resume_refuses_another_recipe_or_a_missing_checkpoint(manifest: Manifest, tmp_path: Path) -> None:
    one = RECIPE.with_changes(epochs=1, precise_bn_batches=0)
    trainer.train(one, manifest, tmp_path / "pkg", device="cpu", progress=False)
    with pytest.raises(ModelError, match=r"differs in recipe\.learning_rate"):
        trainer.train(one.with_changes(learning_rate=0.05), manifest, tmp_path / "pkg", device="cpu",
                      progress=False, resume=True)
    with pytest.raises(ModelError, match="no checkpoint"):
        trainer.train(one.with_changes(task="segmenter"), manifest, tmp_path / "pkg", device="cpu",
                      progress=False, resume=True)
    # An untrained segmenter: the evaluation says so wherever a figure rests on it.
    evaluation = evaluate(manifest, tmp_path / "pkg", device="cpu")
    assert evaluation.untrained_networks == ("segmenter",)
    report = write_report(evaluation, tmp_path / "report", compare_paper=True)
    assert report["segmentation"]["untrained"] and not report["classification"]["untrained"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert UNTRAINED_WARNING in markdown and "Segmentation IoU (UNTRAINED segmenter)" in markdown
    assert "IoU (UNTRAINED segmenter)" in markdown.split("Table 2 beside ours")[1]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["model"]["untrained_networks"] == ["segmenter"]
    assert read_card(tmp_path / "pkg").segmenter.trained is False


def test_imagenet_initialisation_from_a_local_file_and_epoch_logs(
    manifest: Manifest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from torchvision.models import resnet34

    weights = tmp_path / "resnet34-local.pth"
    torch.manual_seed(5)
    torch.save(resnet34(weights=None).state_dict(), weights)  # stands in for torchvision's ImageNet file
    recipe = RECIPE.with_changes(epochs=1, imagenet=str(weights), precise_bn_batches=0)
    with caplog.at_level("INFO", logger="gastrolens.training.trainer"):
        result = trainer.train(recipe, manifest, tmp_path / "pkg", device="cpu", progress=False)
    assert result.package.card.classifier.initialisation == "imagenet(resnet34-local.pth)"
    assert any("classifier epoch 1/1: learning_rate 0.01, train_loss" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="does not exist"):
        RECIPE.with_changes(imagenet=str(tmp_path / "absent.pth"))
