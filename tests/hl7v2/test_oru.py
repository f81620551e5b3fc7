"""The ORU^R01 built from a study SR: read back with python-hl7 (not the library that built it)."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from dicom_io.documents.synthetic import (
    CHINESE_NAME,
    PINYIN_NAME,
    TRAINED,
    UNTRAINED,
    endoscopy_frame,
    lesion_mask,
    make_finding,
    make_source,
)
from gastrolens import UNTRAINED_WARNING
from gastrolens.config.schema import HL7
from gastrolens.dicom_io.documents.outputs import PredecessorRef, write_study_sr
from gastrolens.dicom_io.documents.study_sr_read import read_study_report
from gastrolens.errors import OutputError
from gastrolens.findings import LesionClass, ModelIdentity
from gastrolens.hl7v2.mllp import encode
from gastrolens.hl7v2.oru import build_oru, control_id

STUDY = "1.2.826.0.1.3680043.8.498.100"


def destination(**overrides: object) -> HL7:
    data = {"kind": "hl7", "name": "ris", "host": "127.0.0.1", "port": 2575, "sending_application": "GASTROLENS",
            "sending_facility": "ENDO", "receiving_application": "RIS", "receiving_facility": "HOSP"}
    return HL7.model_validate({**data, **overrides})


def study_sr(folder: Path, classes: list[LesionClass], *, model: ModelIdentity = TRAINED, charset: str = "ISO_IR 192",
             name: str = f"{PINYIN_NAME}={CHINESE_NAME}", patient_id: str = "GL-0001", issuer: str = "HOSP-A",
             accession: str = "ACC1", revision: int = 1, predecessor: PredecessorRef | None = None):
    pairs = []
    for i, cls in enumerate(classes):
        source = make_source([endoscopy_frame(32, 40, seed=i)], study_uid=STUDY, charset=charset, patient_name=name)
        source.PatientID = patient_id
        source.IssuerOfPatientID = issuer
        source.AccessionNumber = accession
        pairs.append((source, [make_finding(lesion_mask(32, 40), cls, confidence=0.6 + i / 10, model=model)]))
    return write_study_sr(pairs, folder, revision=revision, predecessor=predecessor, fsync=False)


def parsed(text: str) -> hl7.Message:
    return hl7.parse(text)


def obx_rows(message: hl7.Message) -> list[tuple[str, str, str, str]]:
    """(OBX-2, OBX-3.1, OBX-5, OBX-11) of every OBX."""
    return [(str(s(2)), str(s(3)(1)(1)), str(s(5)), str(s(11))) for s in message.segments("OBX")]


def test_a_final_result_names_patient_order_classes_model_and_warning(tmp_path):
    written = study_sr(tmp_path, [LesionClass.PU, LesionClass.NORMAL, LesionClass.AGC], model=UNTRAINED)
    built = build_oru(read_study_report(written.output.path), destination())
    message = parsed(built.text)

    msh = message.segment("MSH")
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(12)) == "2.5.1"
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == ("GASTROLENS", "ENDO", "RIS", "HOSP")
    assert str(msh(10)) == built.control_id == control_id(written.output.sop_instance_uid, "ris")
    assert str(msh(18)) == "UNICODE UTF-8"
    pid = message.segment("PID")
    assert str(pid(3)(1)(1)) == "GL-0001" and str(pid(3)(1)(4)) == "HOSP-A"
    names = pid(5)
    assert [(str(r(1)), str(r(2)), str(r(8))) for r in names] == [("Zhang", "Liming", "A"), (CHINESE_NAME, "", "I")]
    obr = message.segment("OBR")
    assert str(obr(2)) == str(obr(3)) == "ACC1"
    assert str(obr(4)(1)(1)) == "76009000" and str(obr(25)) == "F"

    rows = obx_rows(message)
    assert rows[0][:2] == ("CWE", "121077") and rows[0][2].startswith("AGC^Advanced gastric cancer^99GASTROLENS")
    by_code = {code: value for kind, code, value, _ in rows if kind == "NM"}
    assert by_code == {"AGC": "0.8000", "13200003": "0.6000", "17621005": "0.7000"}, "one OBX per reported class"
    model = [value for kind, code, value, _ in rows if code == "111001"]
    assert model == [f"{UNTRAINED.name} {UNTRAINED.version} weights sha256 {UNTRAINED.weights_sha256} (untrained)"]
    assert [value for _, code, value, _ in rows if code == "121106"] == [UNTRAINED_WARNING]
    assert {status for *_, status in rows} == {"F"}


def test_a_trained_model_has_no_warning(tmp_path):
    written = study_sr(tmp_path, [LesionClass.SMT], model=TRAINED)
    rows = obx_rows(parsed(build_oru(read_study_report(written.output.path), destination()).text))
    assert "121106" not in [code for _, code, _, _ in rows]
    assert [value for _, code, value, _ in rows if code == "111001"] == [
        f"{TRAINED.name} {TRAINED.version} weights sha256 {TRAINED.weights_sha256}"]


def test_a_revision_is_a_corrected_result(tmp_path):
    first = study_sr(tmp_path, [LesionClass.PU])
    second = study_sr(tmp_path, [LesionClass.PU, LesionClass.EGC_HGIN], revision=2, predecessor=PredecessorRef(
        first.output.sop_instance_uid, first.output.series_instance_uid, first.output.sop_class_uid))
    message = parsed(build_oru(read_study_report(second.output.path), destination()).text)
    assert str(message.segment("OBR")(25)) == "C"
    assert {status for *_, status in obx_rows(message)} == {"C"}
    assert str(message.segment("MSH")(10)) != control_id(first.output.sop_instance_uid, "ris")


def test_delimiters_in_values_are_escaped(tmp_path):
    written = study_sr(tmp_path, [LesionClass.PU], name="O|Brien^Pat&Co", patient_id="ID^1", accession="A~1")
    text = build_oru(read_study_report(written.output.path), destination()).text
    assert "ID\\S\\1" in text and "A\\R\\1" in text and "O\\F\\Brien" in text and "Pat\\T\\Co" in text
    message = parsed(text)
    assert message.unescape(str(message.segment("PID")(3)(1)(1))) == "ID^1"
    assert len(message.segment("PID")) == len(parsed(text).segment("PID")), "no field split by a delimiter"


@pytest.mark.parametrize(("charset", "destination_charset", "codec"), [
    ("GB18030", "GB 18030-2000", "gb18030"),
    ("GB18030", "UNICODE UTF-8", "utf-8"),
    ("ISO_IR 192", "GB 18030-2000", "gb18030"),
    ("ISO_IR 192", "UNICODE UTF-8", "utf-8"),
])
def test_chinese_names_are_written_in_the_destination_charset(tmp_path, charset, destination_charset, codec):
    written = study_sr(tmp_path, [LesionClass.PU], charset=charset)
    target = destination(charset=destination_charset)
    built = build_oru(read_study_report(written.output.path), target)
    payload = encode(built.text, target)
    assert CHINESE_NAME.encode(codec) in payload
    assert str(parsed(payload.decode(codec)).segment("MSH")(18)) == destination_charset


def test_a_name_the_charset_cannot_hold_is_refused_before_sending(tmp_path):
    from gastrolens.hl7v2.mllp import send_message
    from gastrolens.sending import SendOutcome

    written = study_sr(tmp_path, [LesionClass.PU])
    target = destination(charset="8859/1", port=1)  # nothing listens on port 1: nothing may be tried
    built = build_oru(read_study_report(written.output.path), target)
    result = send_message(built.text, built.control_id, target)
    assert result.outcome is SendOutcome.PERMANENT and "8859/1" in result.reason


def test_no_accession_number_gives_the_study_uid_as_filler(tmp_path):
    written = study_sr(tmp_path, [LesionClass.PU], accession="")
    obr = parsed(build_oru(read_study_report(written.output.path), destination()).text).segment("OBR")
    assert str(obr(2)) == "" and str(obr(3)) == STUDY


def test_no_patient_id_is_refused(tmp_path):
    written = study_sr(tmp_path, [LesionClass.PU], patient_id="")
    with pytest.raises(OutputError, match="Patient ID"):
        build_oru(read_study_report(written.output.path), destination())


def test_an_image_sr_is_no_study_report(tmp_path):
    from gastrolens.dicom_io.documents.outputs import write_outputs

    source = make_source([endoscopy_frame(32, 40)])
    written = write_outputs(source, [make_finding(lesion_mask(32, 40), LesionClass.PU)], tmp_path)
    image_sr = next(w for w in written if w.kind.value == "sr")
    with pytest.raises(OutputError, match="no study conclusion"):
        read_study_report(image_sr.path)


def test_a_study_judged_by_two_models_names_both(tmp_path):
    pairs = []
    for i, (cls, model) in enumerate([(LesionClass.PU, TRAINED), (LesionClass.PU, UNTRAINED)]):
        source = make_source([endoscopy_frame(32, 40, seed=i)], study_uid=STUDY)
        pairs.append((source, [make_finding(lesion_mask(32, 40), cls, confidence=0.7 + i / 10, model=model)]))
    written = write_study_sr(pairs, tmp_path, fsync=False)
    rows = obx_rows(parsed(build_oru(read_study_report(written.output.path), destination()).text))
    models = [value for _, code, value, _ in rows if code == "111001"]
    assert len(models) == 2 and any(TRAINED.weights_sha256 in m for m in models)
    assert any(UNTRAINED.weights_sha256 in m and m.endswith("(untrained)") for m in models)
    assert [value for kind, code, value, _ in rows if kind == "NM"] == ["0.8000"], "one OBX per class, its best"
    assert [value for _, code, value, _ in rows if code == "121106"] == [UNTRAINED_WARNING]
