"""Packet capture input: link-layer decapsulation (``decap``), SIP over TCP and WebSocket
stream reassembly (``tcp``) and capture-file reading (``pcapfile``)."""
