"""``anywan-worker``: the per-core anycast worker process."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="anywan-worker",
        description="anywan anycast worker: carries ESP, ESP-in-UDP and GRE tunnels "
        "between the anycast address and a TUN device, with state from the control node.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("anywan-worker: the packet loop is not built yet (issue: worker dataplane)")
    return 2
