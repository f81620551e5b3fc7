"""End to end on a synthetic data set: `gastrolens train` both networks, `gastrolens evaluate`,
the package served by the engine the daemon uses. CI-sized: 32-40 px inputs, 4 epochs, one CPU thread.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gastrolens import UNTRAINED_WARNING
from gastrolens.cli import main
from gastrolens.config import load_settings
from gastrolens.findings import LesionClass
from gastrolens.models import Engine, load_package, read_card
from gastrolens.samples import endoscopy_frame
from gastrolens.training.synthetic import write_dataset

COMMON = ["--batch-size", "16", "--epochs", "4", "--workers", "0", "--precise-bn-batches", "4", "--no-progress"]


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--log-level", "WARNING", *args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train-evaluate")
    manifest = write_dataset(
        root / "data", lesions_per_class=10, images_per_lesion=2, rows=64, cols=72, dicom_every=9, seed=0
    )
    package = root / "package"
    code, _ = _cli("train", "classifier", "--manifest", str(manifest), "--out", str(package),
                   "--image-size", "32", "--lr", "0.02", *COMMON)
    assert code == 0
    after_classifier = read_card(package)
    classifier_state = {k: v.clone() for k, v in load_package(package).classifier.state_dict().items()}
    code, _ = _cli("train", "segmenter", "--manifest", str(manifest), "--out", str(package),
                   "--image-size", "40", "--lr", "0.02", *COMMON)
    assert code == 0
    report_dir = root / "report"
    code, stdout = _cli("evaluate", "--manifest", str(manifest), "--model", str(package), "--out", str(report_dir),
                        "--split", "test", "--compare-paper")
    assert code == 0
    return {
        "manifest": manifest,
        "package": package,
        "after_classifier": after_classifier,
        "classifier_state": classifier_state,
        "report_dir": report_dir,
        "report": json.loads((report_dir / "report.json").read_text()),
        "stdout": stdout,
    }


def test_training_one_network_leaves_the_other_marked_untrained_then_keeps_it(run: dict[str, Any]) -> None:
    first = run["after_classifier"]
    assert first.classifier.trained and not first.segmenter.trained
    assert first.untrained_networks == ("segmenter",) and "UNTRAINED: segmenter" in first.description
    card = read_card(run["package"])
    assert card.classifier.trained and card.segmenter.trained and not card.untrained_networks
    assert card.classifier.input_size == 32 and card.segmenter.input_size == 40
    assert card.training["classifier"] == first.training["classifier"]  # the classifier's record is kept
    kept = load_package(run["package"]).classifier.state_dict()
    assert all(kept[k].equal(v) for k, v in run["classifier_state"].items())  # and its weights


def test_the_card_records_recipe_data_and_validation_metrics(run: dict[str, Any]) -> None:
    card = read_card(run["package"])
    record = card.training["segmenter"]
    recipe = record["recipe"]
    assert recipe["optimizer"] == "sgd" and recipe["momentum"] == 0.9 and recipe["batch_size"] == 16
    assert recipe["learning_rate"] == 0.02 and recipe["schedule"] == "cosine" and recipe["input_size"] == 40
    data = record["data"]
    assert data["train"]["patients"] + data["validation"]["patients"] == 35  # 7 of 10 patients per class not in test
    assert data["manifest_sha256"] and record["epochs_run"] == 4 and len(record["history"]) == 4
    assert set(card.metrics) == {"classifier", "segmenter"}
    assert card.metrics["classifier"]["validation"]["val_accuracy"] is not None
    assert card.metrics["segmenter"]["validation"]["val_mean_iou"] is not None
    assert (run["package"] / "checkpoints" / "classifier.pt").is_file()


def test_classifier_beats_chance_on_held_out_images(run: dict[str, Any]) -> None:
    overall = run["report"]["classification"]["overall_accuracy"]
    assert overall["n"] == 30  # 3 test patients x 5 classes x 2 images, never trained on
    # chance is 1 in 5; require the 95% interval's lower end above it
    assert overall["ci95"][0] > 0.2, overall


def test_segmenter_iou_is_clearly_above_an_empty_mask(run: dict[str, Any]) -> None:
    seg = run["report"]["segmentation"]
    assert seg["empty_mask_baseline"] == {"mean_iou": 0.0, "pooled_iou": 0.0}
    assert seg["segmenter"]["images_with_lesion"] == 24
    assert seg["segmenter"]["mean_iou"] > 0.25, seg
    assert seg["segmenter"]["pooled_iou"] > 0.2, seg


def test_the_report_puts_the_study_table_beside_ours(run: dict[str, Any]) -> None:
    report, folder = run["report"], run["report_dir"]
    for name in ("confusion_matrix.png", "roc_curves.png", "iou_histogram.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
    egc = report["study_comparison"]["classes"]["egc_hgin"]
    assert egc["sensitivity"]["study"]["k"] == 27 and egc["sensitivity"]["study"]["n"] == 32
    assert egc["lesions"]["ours"] == 3
    per_image = report["classification"]["per_image"]["pu"]
    assert set(per_image) == {"counts", "accuracy", "sensitivity", "specificity", "ppv", "npv"}
    assert per_image["sensitivity"]["ci95"] is not None
    assert set(report["classification"]["roc_auc"]) == {c.value for c in LesionClass}
    assert report["speed"]["images_per_second"] > 0
    markdown = (folder / "report.md").read_text()
    assert "The study's Table 2 beside ours" in markdown and "84.4% (27/32)" in markdown
    assert "per lesion" in markdown and UNTRAINED_WARNING not in markdown
    assert "| egc_hgin | sensitivity | 84.4% (27/32) |" in run["stdout"]
    assert "report:" in run["stdout"]


def test_the_engine_serves_the_trained_package(run: dict[str, Any]) -> None:
    frame, _ = endoscopy_frame(240, 320, LesionClass.SMT, seed=99)
    with Engine.from_path(run["package"], device="cpu") as engine:
        findings = engine.infer([frame, frame[:200, :250].copy()])
        assert not engine.untrained
        assert engine.identity.weights_sha256 == read_card(run["package"]).weights_sha256
    assert len(findings) == 2 and findings[0].mask.shape == (240, 320)
    assert not findings[0].model.untrained
    code, stdout = _cli("models", "info", str(run["package"]))
    assert code == 0 and json.loads(stdout)["segmenter"]["trained"] is True


def test_the_daemon_configuration_accepts_the_package(run: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / "gastrolens.toml"
    config.write_text(f'[model]\npackage = "{run["package"].as_posix()}"\ndevice = "cpu"\n')
    settings = load_settings(config, environ={})
    with Engine.from_settings(settings.model) as engine:  # what `gastrolens serve` builds
        assert engine.identity.weights_sha256 == read_card(run["package"]).weights_sha256
        assert not engine.identity.untrained
        finding = engine.infer([endoscopy_frame(120, 160, LesionClass.PU, seed=7)[0]])[0]
    assert finding.model == engine.identity
