"""``anywanctl``: command-line client of the control node's REST API."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="anywanctl", description="Manage anywan tunnels, PSKs and routes over the REST API."
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("anywanctl: not built yet (issue: control service)")
    return 2
