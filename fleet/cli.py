"""edge-fleet: the operator console. Its commands land with the fleet-console work;
until then it says so instead of pretending."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: edge-fleet COMMAND\n\nThe fleet console has no commands yet.")
        return 0
    print("edge-fleet: the fleet console has no commands yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
