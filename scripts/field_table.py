"""Print the README's Vapi field table from shim.translate.FIELDS, or with --write replace it in
README.md between the fields markers (tests/test_translate.py checks they match)."""

import sys
from pathlib import Path

from shim.translate import FIELDS


def table() -> str:
    lines = ["| Vapi field | status | what the shim does |", "|---|---|---|"]
    lines += [f"| `{rule.path}` | {rule.status} | {rule.summary} |" for rule in FIELDS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parents[1] / "README.md"
        text = readme.read_text()
        head, rest = text.split("<!-- fields:start -->\n", 1)
        _, tail = rest.split("<!-- fields:end -->", 1)
        readme.write_text(f"{head}<!-- fields:start -->\n{table()}<!-- fields:end -->{tail}")
    else:
        print(table(), end="")
