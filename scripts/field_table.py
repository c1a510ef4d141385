"""Print the README's Vapi field table from shim.translate.FIELDS (tests check they match)."""

from shim.translate import FIELDS

print("| Vapi field | status | what the shim does |")
print("|---|---|---|")
for rule in FIELDS:
    print(f"| `{rule.path}` | {rule.status} | {rule.summary} |")
