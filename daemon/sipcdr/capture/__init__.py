"""Packet capture input, I/O only: network listeners (``listeners``), capture files
(``pcapfile``) and live capture from an interface (``live``). Decoding frames down to
SIP is ``sipcdr.decode``."""
