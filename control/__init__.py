"""The control node: IKEv2 responder, REST API, store, CLI.

Never imports ``dataplane``; talks to workers only through ``replication``.
"""
