"""IKEv2 (RFC 7296), sans-IO: message codec, key derivation and state machine.

Modules, one concept each (STYLE: aioquic's shape):

* :mod:`~control.ike.engine` — ``IkeConfig``, ``TunnelAuth``, ``PeerIdentity``,
  ``IkeEngine`` (datagrams and ``now`` in; datagrams, one timer and events out)
* :mod:`~control.ike.events` — frozen event dataclasses for the control glue
* :mod:`~control.ike.connection` — one IKE SA and its Child SAs, either role
* :mod:`~control.ike.state` — the (state, exchange) tables and the error classes
* :mod:`~control.ike.proposals` — our algorithm tables and proposal selection
* :mod:`~control.ike.payloads` / :mod:`~control.ike.messages` — the codec
* :mod:`~control.ike.crypto` — prf+, SKEYSEED, KEYMAT, PSK AUTH, SK payload
* :mod:`~control.ike.dh` — ECP-384 and MODP 14/5 (the one FFDH user)
* ``transport.py`` — the asyncio/uvloop shell (not sans-IO)
"""
