"""``llama-tui``: the terminal chat client (built in a later milestone)."""

from __future__ import annotations

import sys


def main() -> int:
    print("llama-tui is not available yet; use `llamactl` to control llamad.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
