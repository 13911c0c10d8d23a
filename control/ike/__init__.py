"""IKEv2 (RFC 7296), sans-IO: message codec, key derivation and state machine."""
