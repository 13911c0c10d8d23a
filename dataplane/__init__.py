"""The anycast worker: ESP/GRE codecs, SA and route tables, packet loop, TUN and sockets.

Never imports ``control``; learns everything from ``replication``.
"""
