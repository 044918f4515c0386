"""Pure decoding of captured frames down to SIP payloads.

``link`` (the ``Decapsulator``: link layers), ``ip`` (IPv4/IPv6 and fragment
reassembly), ``tunnels``, ``sctp`` (each a layer the decapsulator is made of, producing
transport ``Segment`` records, see ``base``), ``tcp`` and ``websocket`` (stream
reassembly and SIP framing), ``startline`` (SIP recognised by content) and ``extract``
(``SipExtractor``: frames to SIP ``Packet`` records, HEP unwrapped).

Everything here takes bytes and capture timestamps and returns records: no I/O, no
clock, no logging. What is dropped is counted in stats objects the caller reads.
"""
