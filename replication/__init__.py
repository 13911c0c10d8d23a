"""The state bus from control to workers: record schema, publisher, subscriber."""
