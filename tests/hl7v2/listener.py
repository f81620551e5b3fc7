"""An HL7 v2 MLLP listener for tests: hl7apy's MLLPServer (GastroLens sends with python-hl7's
client, so the two ends of the wire are independent implementations). It parses each message
with hl7apy and answers with an ACK it builds itself."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPRequestHandler, MLLPServer
from hl7apy.parser import parse_message

from support import free_port


@dataclass
class Listener:
    """An MLLP listener that answers every ORU^R01 with ``answer`` (AA, AE, AR)."""

    answer: str = "AA"
    codec: str = "utf-8"
    port: int = field(default_factory=free_port)
    received: list[Message] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        listener = self

        class Handler(AbstractHandler):  # type: ignore[misc]
            def reply(self) -> str:
                listener.raw.append(self.incoming_message)
                message = parse_message(self.incoming_message, find_groups=False)
                listener.received.append(message)
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_3 = "RIS"
                ack.msh.msh_5 = "GASTROLENS"
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = f"ACK{len(listener.received)}"
                ack.msh.msh_11 = "P"
                ack.msh.msh_18 = message.msh.msh_18.to_er7()
                ack.msa.msa_1 = listener.answer
                ack.msa.msa_2 = message.msh.msh_10.to_er7()
                if listener.answer != "AA":
                    ack.msa.msa_3 = "order not found"
                return str(ack.to_mllp())

        class Request(MLLPRequestHandler):  # type: ignore[misc]
            encoding = self.codec

        self.server = MLLPServer("127.0.0.1", self.port, {"ORU^R01^ORU_R01": (Handler,)}, timeout=5,
                                 request_handler_class=Request)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
