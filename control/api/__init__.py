"""The REST API of anywan-control (Magic WAN compatible): see app.py and openapi.py."""
