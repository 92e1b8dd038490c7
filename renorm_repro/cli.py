"""Command-line entry point ``renorm-repro`` (placeholder until the reproduction lands)."""


def main(argv=None):
    raise SystemExit("renorm-repro: the reproduction pipeline is not implemented yet")
