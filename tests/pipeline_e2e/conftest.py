"""End-to-end fixtures: the tiny model package, the daemon, DCMTK storescp and Orthanc (see peers.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gastrolens.models import save_package, untrained_package
from pipeline_e2e.peers import TINY_CLASSIFIER, TINY_SEGMENTER, Orthanc, StoreSCP, start_storescp
from support import Daemon, start_daemon, write_config

SEGMENTER_BIAS_SHIFT = 0.6


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained package (64 px classifier, 65 px segmenter): fast on a CPU.

    The untrained segmenter's logits sit around -0.7 on the synthetic frames, so it would
    never outline anything and no SEG would ever be written; its last bias is raised by
    ``SEGMENTER_BIAS_SHIFT`` so that masks cover part of most frames (and nothing of some).
    """
    folder = tmp_path_factory.mktemp("tiny-model")
    package = untrained_package(classifier_input_size=TINY_CLASSIFIER, segmenter_input_size=TINY_SEGMENTER)
    with torch.no_grad():
        package.segmenter.classifier[-1].bias += SEGMENTER_BIAS_SHIFT
    package.card = package.card.model_copy(update={"version": f"{package.card.version}-e2e-mask-bias"})
    save_package(package, folder)
    return folder


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """Start `gastrolens serve` subprocesses; any still running is killed in teardown."""
    started: list[Daemon] = []

    def start(config_text: str, path: Path) -> Daemon:
        began = time.monotonic()
        daemon = start_daemon(write_config(path, config_text))
        print(f"daemon {path.stem} ready in {time.monotonic() - began:.1f} s")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait(timeout=30)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = start_storescp(tmp_path)
    yield scp
    scp.stop()




@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[[int], Orthanc]]:
    started: list[Orthanc] = []

    def make(gastrolens_port: int) -> Orthanc:
        server = Orthanc(tmp_path / "orthanc", gastrolens_port)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
