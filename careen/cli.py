"""Command-line entry point (placeholder until the verbs land)."""


def main() -> int:
    return 0
