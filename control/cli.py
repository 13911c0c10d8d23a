"""``anywan-control``: the control node (IKEv2 responder, REST API, SA publisher)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="anywan-control",
        description="anywan control node: IKEv2 responder, REST API and state publisher.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("anywan-control: not built yet (issue: control service)")
    return 2
