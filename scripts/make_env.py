"""Write a development `.env` from `.env.example`, with DEBUG on and a new secret key.

Run by `make run` when no `.env` exists. It never overwrites an existing file.
"""

import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    target = ROOT / ".env"
    if target.exists():
        print(f"{target} already exists; leaving it as it is.", file=sys.stderr)
        return 0
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("SECRET_KEY="):
            line = f"SECRET_KEY={secrets.token_urlsafe(50)}"
        elif line.startswith("DEBUG="):
            line = "DEBUG=on"
        lines.append(line)
    # Only the owner may read the file, because it contains the secret key and
    # the operator adds the upstream's API key to it.
    target.touch(mode=0o600)
    target.write_text("\n".join(lines) + "\n")
    print(
        f"Wrote {target} for development (DEBUG=on, new SECRET_KEY).", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
