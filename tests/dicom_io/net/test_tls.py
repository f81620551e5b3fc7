"""DICOM TLS against real peers: DCMTK's echoscu/storescu and `gastrolens serve` as a subprocess.

The variant without `ca` runs the receiver in-process: the daemon loads the model at
start, which takes seconds.

A throwaway PKI is made with the openssl CLI: a CA, a server certificate, a client
certificate it signed, and a client certificate from a foreign CA.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import support
from gastrolens.config import load_settings
from gastrolens.daemon.ingest import DatabaseIngest
from gastrolens.db import Database
from gastrolens.dicom_io.net.receiver import Receiver
from gastrolens.errors import ConfigError
from gastrolens.storage.store import Store

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

pytestmark = pytest.mark.skipif(not Path("/usr/bin/echoscu").exists(), reason="DCMTK is not installed")


# -- a throwaway PKI --------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", f"{name}.key",
             "-out", f"{name}.crt", "-subj", f"/CN=GastroLens test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _make_leaf(folder: Path, name: str, ca: str, cn: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-days", "2", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "foreign-ca")
    _make_leaf(folder, "server", "ca", "localhost",
               "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    _make_leaf(folder, "client", "ca", "ENDO_WS1", client_ext)
    _make_leaf(folder, "intruder", "foreign-ca", "ENDO_WS1", client_ext)
    return folder


# -- a small Secondary Capture ----------------------------------------------------------


@pytest.fixture(scope="module")
def sc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 64x64 RGB Secondary Capture, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^TLS"
    ds.PatientID = "TLS-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-TLS-1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "ES"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 180
    rgb[..., 1] = np.linspace(40, 90, 64, dtype=np.uint8)[None, :]
    rgb[..., 2] = 60
    ds.PixelData = rgb.tobytes()
    path = tmp_path_factory.mktemp("sc") / "sc.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# -- the daemon -------------------------------------------------------------------------


@dataclass
class Daemon:
    """`gastrolens serve` (started by the suite's shared helper) and its SQLite database."""

    serve: support.Daemon
    database: Path

    @property
    def port(self) -> int:
        return self.serve.port

    @property
    def config(self) -> Path:
        return self.serve.config

    def stop(self) -> int:
        return self.serve.stop()

    def stderr(self) -> str:
        return self.serve.log

    def audit_reasons(self, event_type: str, expect: str, timeout: float = 5) -> list[str]:
        """Reasons of ``event_type`` audit rows, waiting up to ``timeout`` for one containing ``expect``.

        The peer may see the refusal before the daemon has committed its audit row.
        """
        deadline = time.monotonic() + timeout
        while True:
            with sqlite3.connect(self.database) as conn:
                rows = conn.execute("SELECT detail FROM audit_events WHERE event_type = ?", (event_type,)).fetchall()
            reasons = [json.loads(detail).get("reason", "") for (detail,) in rows]
            if any(expect in r for r in reasons) or time.monotonic() > deadline:
                return reasons
            time.sleep(0.05)


def _tls_config(folder: Path, pki: Path, *, ca: bool, cert: Path | None = None, model: Path | None = None) -> Path:
    ca_line = f'ca = "{pki / "ca.crt"}"' if ca else ""
    model_section = f'[model]\npackage = "{model}"' if model else ""
    config = folder / "gastrolens.toml"
    config.write_text(f"""
[dicom]
port = 0
network_timeout_seconds = 10
[dicom.tls]
enabled = true
cert = "{cert or pki / 'server.crt'}"
key = "{pki / 'server.key'}"
{ca_line}
[storage]
root = "{folder / 'storage'}"
min_free_mb = 1
[database]
url = "sqlite:///{folder / 'gastrolens.db'}"
{model_section}
""")
    return config


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Path, tiny_model: Path) -> Iterator[Daemon]:
    """TLS with `ca` set: client certificates signed by our CA are required."""
    yield from _daemon(tmp_path_factory.mktemp("tls-ca"), pki, tiny_model, ca=True)


@pytest.fixture(scope="module")
def tls_receiver_no_ca(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[int]:
    """TLS without `ca` (any client, no client certificate asked): the receiver in-process, for speed.

    Yields its port.
    """
    folder = tmp_path_factory.mktemp("tls-noca")
    settings = load_settings(_tls_config(folder, pki, ca=False), environ={})
    db = Database(settings.database.url)
    db.upgrade()
    ingest = DatabaseIngest(Store(settings.storage.root, min_free_mb=1), db)
    receiver = Receiver(settings.dicom, ingest)
    receiver.start()
    try:
        yield receiver.port
    finally:
        receiver.stop(drain_seconds=5)
        ingest.close()
        db.dispose()


def _daemon(folder: Path, pki: Path, model: Path, *, ca: bool) -> Iterator[Daemon]:
    config = _tls_config(folder, pki, ca=ca, model=model)
    daemon = Daemon(support.start_daemon(config, timeout=180), folder / "gastrolens.db")
    yield daemon
    assert daemon.stop() == 0, f"gastrolens serve did not exit 0 on SIGTERM:\n{daemon.stderr()[-3000:]}"


# -- DCMTK clients ----------------------------------------------------------------------


def dcmtk(tool: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([f"/usr/bin/{tool}", *args], env=env, capture_output=True, text=True, timeout=timeout)


def with_cert(pki: Path, name: str = "client") -> list[str]:
    """echoscu/storescu options: TLS with our key and certificate, server verified against our CA."""
    return ["+tls", str(pki / f"{name}.key"), str(pki / f"{name}.crt"), "+cf", str(pki / "ca.crt")]


def without_cert(pki: Path) -> list[str]:
    """TLS without a client certificate (DCMTK's anonymous TLS); the server is still verified."""
    return ["+tla", "+cf", str(pki / "ca.crt")]


def echo(peer: Daemon | int, *tls: str) -> subprocess.CompletedProcess[str]:
    port = peer if isinstance(peer, int) else peer.port
    return dcmtk("echoscu", "-to", "10", "-ta", "10", "-aet", "ENDO_WS1", "-aec", "GASTROLENS", *tls,
                 "127.0.0.1", str(port))


def status(daemon: Daemon) -> dict:
    return json.loads(daemon.serve.gastrolens("status", "--json").stdout)


# -- with ca: client certificates required ----------------------------------------------


def test_echo_over_tls_with_a_client_certificate(tls_daemon: Daemon, pki: Path) -> None:
    done = echo(tls_daemon, *with_cert(pki))
    assert done.returncode == 0, done.stderr


def test_store_over_tls(tls_daemon: Daemon, pki: Path, sc_file: Path) -> None:
    done = dcmtk("storescu", "-to", "10", "-aet", "ENDO_WS1", "-aec", "GASTROLENS", *with_cert(pki),
                 "127.0.0.1", str(tls_daemon.port), str(sc_file))
    assert done.returncode == 0, done.stderr
    counts = status(tls_daemon)
    # the pipeline may have claimed it already: count every state
    assert sum(counts["instances"].values()) == 1 and counts["quarantined"] == 0, counts
    stored = list((tls_daemon.config.parent / "storage" / "instances").rglob("*.dcm"))
    assert [p.read_bytes()[128:132] for p in stored] == [b"DICM"]


def test_plain_tcp_is_refused(tls_daemon: Daemon) -> None:
    done = echo(tls_daemon)
    assert done.returncode != 0
    reasons = tls_daemon.audit_reasons("association.rejected", "WRONG_VERSION_NUMBER")
    assert any("TLS handshake failed" in r and "WRONG_VERSION_NUMBER" in r for r in reasons), reasons


def test_tls_without_a_client_certificate_is_refused(tls_daemon: Daemon, pki: Path) -> None:
    done = echo(tls_daemon, *without_cert(pki))
    assert done.returncode != 0
    reasons = tls_daemon.audit_reasons("association.rejected", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r for r in reasons), reasons


def test_client_certificate_of_another_ca_is_refused(tls_daemon: Daemon, pki: Path) -> None:
    done = echo(tls_daemon, *with_cert(pki, "intruder"))
    assert done.returncode != 0
    reasons = tls_daemon.audit_reasons("association.rejected", "CERTIFICATE_VERIFY_FAILED")
    assert any("CERTIFICATE_VERIFY_FAILED" in r for r in reasons), reasons


def test_an_idle_connection_does_not_block_the_listener(tls_daemon: Daemon, pki: Path) -> None:
    """A peer that connects and never starts the handshake must not hold up other peers."""
    with socket.create_connection(("127.0.0.1", tls_daemon.port)):
        time.sleep(0.2)  # let the server accept it
        started = time.monotonic()
        done = echo(tls_daemon, *with_cert(pki))
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 8


# -- without ca: no client certificate needed -------------------------------------------


def test_without_ca_a_client_needs_no_certificate(tls_receiver_no_ca: int, pki: Path) -> None:
    assert echo(tls_receiver_no_ca, *without_cert(pki)).returncode == 0
    assert echo(tls_receiver_no_ca, *with_cert(pki)).returncode == 0
    assert echo(tls_receiver_no_ca).returncode != 0  # TLS is still required


# -- bad TLS settings stop start-up -----------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "reason"),
    [("missing.crt", "No such file or directory"), (".", "Is a directory")],
    ids=["missing", "directory"],
)
def test_an_unreadable_cert_is_a_config_error(tmp_path: Path, pki: Path, cert: str, reason: str) -> None:
    config = _tls_config(tmp_path, pki, ca=True, cert=tmp_path / cert)
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert caught.value.key == "dicom.tls.cert"
    assert str(config) in str(caught.value)
    assert reason in str(caught.value)


def test_gastrolens_serve_refuses_to_start_with_an_unreadable_cert(tmp_path: Path, pki: Path) -> None:
    config = _tls_config(tmp_path, pki, ca=True, cert=tmp_path / "missing.crt")
    done = subprocess.run([*support.GASTROLENS, "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    stderr = done.stderr
    assert f"{config}: dicom.tls.cert: cannot read {tmp_path / 'missing.crt'}" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "gastrolens.db").exists()


def test_a_key_that_does_not_match_the_cert_is_a_config_error(tmp_path: Path, pki: Path) -> None:
    config = _tls_config(tmp_path, pki, ca=True, cert=pki / "client.crt")
    with pytest.raises(ConfigError, match="dicom.tls: cert .* and key .* do not load"):
        load_settings(config, environ={})


def test_client_tls_args_as_every_sender_uses_them(pki: Path) -> None:
    """Delivery, C-MOVE and storage commitment reports share one client side: none without TLS; else the peer's
    certificate checked against its CA (not its host name) and ours presented when configured."""
    import ssl

    from gastrolens.config.schema import DestinationTLS
    from gastrolens.dicom_io.net.tls import client_tls_args

    assert client_tls_args(DestinationTLS(), "pacs") is None
    tls = DestinationTLS(enabled=True, ca=pki / "ca.crt", cert=pki / "client.crt", key=pki / "client.key")
    args = client_tls_args(tls, "pacs")
    assert args is not None
    ctx, host = args
    assert host == "pacs" and ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "GastroLens test ca"),),)]
