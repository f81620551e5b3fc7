"""docs/conformance-statement.md says what the code does: presentation contexts, roles, statuses.

The SCP side is read from the AE the receiver builds as the daemon builds it (every
service of ``daemon.dicom_services`` plugged in), the SCU side from the constants each
sender proposes. A SOP class or transfer syntax the code accepts or proposes and the
statement does not list fails a test, and the other way round.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES

from gastrolens.config import Settings
from gastrolens.daemon.dicom_services import dicom_services
from gastrolens.db import Database
from gastrolens.dicom_io.net import commitment, inspect, mpps, qr_identifier, query_retrieve, received, send, services
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.storage.store import Store

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"

ROLES = {(None, None): "SCP", (True, True): "SCP; SCU for C-GET", (False, True): "SCU for C-GET"}
"""pynetdicom's (scu_role, scp_role) of a supported context, as the statement's Roles column says it."""


def table(heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after ``heading``, cells stripped of backticks."""
    text = STATEMENT.read_text(encoding="utf-8")
    assert heading in text, f"the statement has no section {heading!r}"
    rows: list[list[str]] = []
    for line in text.split(heading, 1)[1].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows[1:]


def syntax_sets() -> dict[str, set[str]]:
    sets: dict[str, set[str]] = {}
    for name, _, uid in table("### Transfer syntax sets"):
        sets.setdefault(name, set()).add(uid)
    return sets


@pytest.fixture(scope="module")
def live_contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[set[str], str]]:
    """What the receiver accepts: SOP class UID -> (transfer syntaxes, roles)."""
    tmp = tmp_path_factory.mktemp("conformance")
    settings = Settings.model_validate({"storage": {"root": str(tmp / "storage")},
                                        "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"}})
    db = Database(settings.database.url)
    try:
        receiver = Receiver(settings.dicom, cast(Any, None),
                            services=dicom_services(settings, db, Store(settings.storage.root, fsync=False)))
        contexts = {str(c.abstract_syntax): ({str(t) for t in c.transfer_syntax}, ROLES[(c.scu_role, c.scp_role)])
                    for c in receiver.ae.supported_contexts}
        for service in receiver.services:
            service.close()
    finally:
        db.dispose()
    return contexts


def test_the_transfer_syntax_sets_are_the_codes_own() -> None:
    sets = syntax_sets()
    assert sets["Storage"] == {str(t) for t in ALL_TRANSFER_SYNTAXES}
    assert sets["Default"] == {str(t) for t in DEFAULT_TRANSFER_SYNTAXES}
    assert sets["Delivery"] == {str(t) for t in send.STORED_SYNTAXES} | {str(ImplicitVRLittleEndian)}
    assert set(query_retrieve.UNCOMPRESSED) <= sets["Storage"], "a C-MOVE proposes the files' syntaxes and these"


def test_every_accepted_context_is_listed_and_every_listed_one_accepted(
    live_contexts: dict[str, tuple[set[str], str]],
) -> None:
    sets = syntax_sets()
    listed = {uid: (sets[syntaxes], roles) for _, uid, syntaxes, roles in table("### SCP presentation contexts")}
    assert listed == live_contexts


def test_every_proposed_context_is_listed() -> None:
    sets = syntax_sets()
    listed: dict[tuple[str, str], str] = {}
    for _, uid, syntaxes, used_for in table("### SCU presentation contexts"):
        listed[(uid, used_for)] = syntaxes
        assert syntaxes in sets, f"unknown transfer syntax set {syntaxes!r}"
    delivered: dict[str, set[str]] = {}
    for sop_class, syntaxes in send._contexts(query_retrieve.OUTPUT_SOP_CLASSES):
        delivered.setdefault(sop_class, set()).update(syntaxes)
    moved = set(Settings().dicom.accepted_sop_classes) | set(query_retrieve.OUTPUT_SOP_CLASSES)
    expected = {(uid, "C-STORE delivery of outputs"): "Delivery" for uid in delivered}
    expected |= {(uid, "C-MOVE sub-operations"): "Storage" for uid in moved}
    expected[(services.STORAGE_COMMITMENT_PUSH_MODEL, "N-EVENT-REPORT (requestor in the SCP role)")] = "Default"
    assert listed == expected
    assert all(sets["Delivery"] == syntaxes for syntaxes in delivered.values())


def test_the_output_sop_classes_are_what_the_writers_write() -> None:
    from gastrolens.dicom_io.documents import overlay, sr

    assert sr.COMPREHENSIVE_SR == query_retrieve.COMPREHENSIVE_SR_STORAGE
    assert {overlay.SECONDARY_CAPTURE, overlay.MULTIFRAME_TRUE_COLOR_SC} <= set(query_retrieve.OUTPUT_SOP_CLASSES)
    from pydicom.uid import SegmentationStorage  # highdicom's Segmentation writes this class

    assert str(SegmentationStorage) == query_retrieve.SEGMENTATION_STORAGE


def test_every_status_the_code_answers_is_explained() -> None:
    text = STATEMENT.read_text(encoding="utf-8")
    documented = {int(code, 16) for code in re.findall(r"0x([0-9A-Fa-f]{4})", text)}
    answered = {
        value
        for module in (received, inspect, qr_identifier, query_retrieve, services, commitment, mpps)
        for name, value in vars(module).items()
        if name.startswith("STATUS_") and isinstance(value, int)
    }
    assert answered - documented == set()
