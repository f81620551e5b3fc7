"""Sending one HL7 v2 message over MLLP with python-hl7's client, and what the ACK says.

One connection per message: a result is sent once per study conclusion, and many
listeners (hl7apy's among them) close the connection after answering. The message is
encoded in the destination's MSH-18 character set before anything is sent, so a name the
set cannot write fails at once (permanent) instead of arriving garbled.

The ACK (original acknowledgement mode, MSA-1) decides:

- AA (or CA): sent.
- AE, AR (and CE, CR): retried with the usual backoff, then ``dead``: the listener may
  refuse for a reason that passes (its database is down, the order is not there yet).
- no ACK within ``ack_timeout_seconds``, a refused or dropped connection, an ACK that is
  no HL7, has no MSA or acknowledges another message (MSA-2 is not our MSH-10): retried.
"""

from __future__ import annotations

import asyncio
import logging

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from gastrolens.config.schema import HL7, HL7_CHARSETS
from gastrolens.sending import SendResult, permanent, retry, sent

log = logging.getLogger(__name__)

UNREACHABLE = "HL7: no answer"
"""How the result of a message the listener never answered begins (a timeout, a refused or dropped connection)."""

ACCEPTED = frozenset({"AA", "CA"})
REFUSED = frozenset({"AE", "AR", "CE", "CR"})


def encode(text: str, destination: HL7) -> bytes:
    """``text`` in the destination's character set; UnicodeEncodeError when it cannot hold it."""
    return text.encode(HL7_CHARSETS[destination.charset])


def send_message(text: str, control_id: str, destination: HL7) -> SendResult:
    """Send one ER7 message to ``destination`` and judge its ACK."""
    try:
        payload = encode(text, destination)
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end]
        return permanent(f"HL7: {bad!r} cannot be written in the destination's character set {destination.charset}")
    try:
        answer = asyncio.run(_exchange(payload, destination))
    except TimeoutError:
        return retry(f"{UNREACHABLE}: no ACK within {destination.ack_timeout_seconds:g} s")
    except OSError as exc:
        return retry(f"{UNREACHABLE}: cannot reach {destination.host}:{destination.port}: {exc.strerror or exc}")
    except asyncio.IncompleteReadError:
        return retry(f"{UNREACHABLE}: the listener closed the connection without an ACK")
    except (InvalidBlockError, ValueError) as exc:  # a malformed or oversized MLLP block
        return retry(f"HL7: unreadable answer: {exc}")
    return judge_ack(answer, control_id, destination)


async def _exchange(payload: bytes, destination: HL7) -> bytes:
    codec = HL7_CHARSETS[destination.charset]
    async with asyncio.timeout(destination.ack_timeout_seconds):
        reader, writer = await open_hl7_connection(destination.host, destination.port, encoding=codec)
        try:
            writer.writeblock(payload)
            await writer.drain()
            block: bytes = await reader.readblock()
            return block
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:  # the listener hung up first: the answer is already read
                pass


def judge_ack(answer: bytes, control_id: str, destination: HL7) -> SendResult:
    """What the listener's answer says of the message whose MSH-10 was ``control_id``."""
    try:
        text = answer.decode(HL7_CHARSETS[destination.charset])
        message = hl7.parse(text)
        msa = message.segment("MSA")
    except (UnicodeDecodeError, hl7.ParseException, KeyError, IndexError) as exc:
        return retry(f"HL7: the answer is no ACK ({exc.__class__.__name__}: {str(exc)[:200]})")
    code = str(msa(1)).strip().upper()
    acknowledged = str(msa(2)).strip() if len(msa) > 2 else ""
    why = str(msa(3)).strip() if len(msa) > 3 else ""
    if acknowledged != control_id:
        return retry(f"HL7: the ACK is for message {acknowledged!r}, not {control_id!r}")
    if code in ACCEPTED:
        return sent()
    if code in REFUSED:
        return retry(f"HL7: the listener answered {code}" + (f": {why}" if why else ""))
    return retry(f"HL7: unknown acknowledgement code {code!r}")
