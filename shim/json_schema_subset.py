"""A JSON-Schema subset every function-calling API accepts: `sanitize_schema` rewrites any
JSON Schema into it, with a finding for every change. Pure, no I/O, nothing Vapi-specific (the Vapi
tool converters in `shim.tool_schema` use it for `parameters`).

What the Realtime API accepts in `parameters` is not fully documented, so the output is a plain
subset, chosen as the keywords OpenAI documents for its *strictest* mode (Structured Outputs'
supported-keyword list) intersected with what Vapi's own `JsonSchema` model declares, so the
least likely to be refused anywhere:

* every node has exactly one `type`, a string among string/number/integer/boolean/array/object;
* `description` (strings only);
* objects: `properties` (always present, possibly `{}`), `required` (only names of declared
  properties, deduplicated, omitted when empty), `additionalProperties` (booleans only);
* arrays: `items` (always present; a single schema), `minItems` / `maxItems`;
* strings: `pattern` (only if it is a string that compiles as a regular expression), `format` only
  for date-time/time/date/duration/email/hostname/ipv4/ipv6/uuid (the set both OpenAI and Vapi list);
* numbers/integers: `minimum` / `maximum` (finite numbers);
* `enum`: non-empty list of finite scalars of the node's type (numeric and boolean values are
  kept when the type is number/integer/boolean).

Kept out on purpose, moved into the description text so the model still reads them:
`minLength`/`maxLength`, `exclusiveMinimum`/`exclusiveMaximum`, `multipleOf`, `uniqueItems`,
`minProperties`/`maxProperties`, other `format`s, `title` (used as the description when there is
none), `default`, `examples`/`example`. Nullability (`type: [..., "null"]`, a null union branch,
OpenAPI `nullable`) becomes "may be null" in the description; the key stays required if it was.

Rewritten: `$ref` (JSON pointers into the schema root; `$defs`/`definitions` are inlined at each
use, a reference to a schema already being expanded is cut with a finding), `allOf` (merged:
properties/required united, enums intersected, the stricter bound kept), `const` (single-value
enum), type arrays and `anyOf`/`oneOf` (nulls dropped; one remaining type -> that type; several
object branches -> their properties merged with `required` = the intersection; several array
branches -> `items` becomes the union of their items; numbers and integers -> number; mixed
types -> `string` with the alternatives listed in the description, unless the node's own keywords
pick one of them). A missing type is inferred from `properties` (object), `items` (array),
`enum` values or numeric bounds, else string. A top level that is not an object is wrapped as
`{"value": ...}`. Annotations with no effect (`$schema`, `$id`, `$comment`, `x-*`, `readOnly`, …)
are dropped; validation keywords outside the subset that cannot be worded (`not`, `if`/`then`/
`else`, `patternProperties`, `dependentRequired`, …) are dropped as `unsupported`.

Errors: `ToolSchemaError` only for input that is not Vapi-tool- or JSON-Schema-shaped at all (a tool
that is not an object or has no `type`, a `function` tool without `function.name`, `parameters`
that is a string, ...). Odd but valid schemas never raise; malformed keyword values deep inside a
schema are dropped with a finding. Nesting is cut at `MAX_DEPTH` levels, `MAX_NODES` nodes per schema
(a `$ref` DAG can otherwise blow up when inlined) and `MAX_NESTING` stacked allOf/anyOf/$ref levels.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

__all__ = ["APPROXIMATED", "MAPPED", "MAX_DEPTH", "SAFE_FORMATS", "UNSUPPORTED", "Finding", "ToolSchemaError", "sanitize_schema"]

MAPPED = "mapped"
APPROXIMATED = "approximated"
UNSUPPORTED = "unsupported"

MAX_DEPTH = 10
MAX_NODES = 2000
MAX_NESTING = 32

TYPES = ("string", "number", "integer", "boolean", "array", "object")
SAFE_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"})
_TYPE_ALIASES = {
    "str": "string", "text": "string", "int": "integer", "long": "integer", "float": "number",
    "double": "number", "decimal": "number", "bool": "boolean", "list": "array", "dict": "object",
    "map": "object",
}


@dataclass(frozen=True)
class Finding:
    path: str  # JSON path in the assistant/tool JSON
    status: str  # "mapped" | "approximated" | "unsupported"
    detail: str  # what was done / what the user loses, one sentence


class ToolSchemaError(ValueError):
    """Input that is not a Vapi tool / JSON Schema at all. The message names path, value, expectation."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _show(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):  # pragma: no cover - default=repr covers it
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _error(path: str, value: Any, expected: str) -> ToolSchemaError:
    return ToolSchemaError(f"{path}: expected {expected}, got {_type_name(value)} {_show(value)}")


_IDENT = re.compile(r"[A-Za-z_$][A-Za-z0-9_$-]*")


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.fullmatch(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _keep_bounds(flat: dict, out: dict, path: str, ctx, keys: tuple[str, str], valid, expected: str) -> None:
    """Copy a (lower, upper) pair of bounds that are valid and consistent; report the rest."""
    (lo_key, hi_key) = keys
    lo, hi = flat.get(lo_key), flat.get(hi_key)
    for k, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and not valid(v):
            ctx.add(_key(path, k), UNSUPPORTED, f"{k} is not {expected}: dropped")
    if valid(lo) and valid(hi) and lo > hi:
        ctx.add(_key(path, lo_key), UNSUPPORTED, f"{lo_key} > {hi_key}: both dropped")
        return
    for k, v in ((lo_key, lo), (hi_key, hi)):
        if valid(v):
            out[k] = v


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, bool)) or _is_num(v)


def _enum_kind(values: Any) -> str | None:
    """The type implied by enum values (None: no usable value)."""
    if not isinstance(values, list):
        return None
    vals = [v for v in values if v is not None]
    if not vals:
        return "null" if values else None
    if not all(_is_scalar(v) for v in vals):
        return "string" if any(_is_scalar(v) for v in vals) else None
    if all(isinstance(v, bool) for v in vals):
        return "boolean"
    if all(isinstance(v, str) for v in vals):
        return "string"
    if all(_is_num(v) for v in vals):
        return "integer" if all(isinstance(v, int) for v in vals) else "number"
    return "string"  # mixed scalars: sent as strings


# ---------------------------------------------------------------------------------------------
# JSON Schema sanitizing

# Private markers carried on flattened (intermediate) schema dicts. JSON keys are always strings,
# so object keys cannot collide with anything a user wrote.
_NOTES: Any = object()  # list[str]: appended to the description
_NULLABLE: Any = object()  # bool: "may be null"

_IGNORED = frozenset({
    "$schema", "$id", "$comment", "$anchor", "$dynamicAnchor", "$dynamicRef", "$vocabulary", "$recursiveAnchor",
    "readOnly", "writeOnly", "deprecated", "contentMediaType", "contentEncoding", "contentSchema",
    "discriminator", "xml", "externalDocs", "id",
})
_WORDED = frozenset({
    "title", "default", "examples", "example", "minLength", "maxLength", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "uniqueItems", "minProperties", "maxProperties",
})
_STRUCTURAL = frozenset({
    "type", "description", "properties", "required", "additionalProperties", "items", "prefixItems", "enum",
    "minItems", "maxItems", "minimum", "maximum", "pattern", "format", "$defs", "definitions",
})
_OBJECT_HINTS = ("properties", "required", "additionalProperties", "minProperties", "maxProperties",
                 "patternProperties", "propertyNames", "dependentRequired")
_ARRAY_HINTS = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains")
_NUMBER_HINTS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STRING_HINTS = ("pattern", "format", "minLength", "maxLength")


class _Ctx:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.findings: list[Finding] = []
        self.ref_stack: list[str] = ["#"]
        self.nodes = 0
        self.nesting = 0  # _flatten recursion (allOf/anyOf/$ref chains within one node)
        self.cut_reported = False

    def add(self, path: str, status: str, detail: str) -> None:
        self.findings.append(Finding(path, status, detail))

    def over_budget(self, path: str) -> bool:
        self.nodes += 1
        if self.nodes <= MAX_NODES:
            return False
        if not self.cut_reported:
            self.cut_reported = True
            self.add(path, UNSUPPORTED, f"schema larger than {MAX_NODES} nodes once inlined: cut here, the rest is a free-form string")
        return True


def _kind(flat: dict) -> str | None:
    """The type a flattened node stands for, or None when it does not constrain the type."""
    t = flat.get("type")
    if isinstance(t, str):
        t = _TYPE_ALIASES.get(t, t)
        if t in TYPES or t == "null":
            return t
    if any(k in flat for k in _OBJECT_HINTS):
        return "object"
    if any(k in flat for k in _ARRAY_HINTS):
        return "array"
    if "enum" in flat:
        return _enum_kind(flat["enum"])
    return None


def _resolve_pointer(root: Any, ref: str) -> tuple[bool, Any]:
    if ref == "#":
        return True, root
    if not ref.startswith("#/"):
        return False, None
    node = root
    for raw in ref[2:].split("/"):
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _guess_type(node: Any) -> str:
    if isinstance(node, dict):
        t = node.get("type")
        if isinstance(t, str) and t in TYPES:
            return t
        if isinstance(t, list):
            ts = [x for x in t if x in TYPES]
            if len(ts) == 1:
                return ts[0]
        if "properties" in node:
            return "object"
        if "items" in node:
            return "array"
    return "string"


def _cut_node(kind: str, note: str) -> dict:
    out: dict = {"type": kind, _NOTES: [note]}
    if kind == "array":
        out["items"] = {"type": "object"}
    return out


def _merge(parts: list[dict], path: str, ctx: _Ctx) -> dict:
    """allOf semantics over flattened parts (own keywords first: they win conflicts)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    if len(parts) == 1:
        return dict(parts[0])
    out: dict = {}
    notes: list[str] = []
    nullable = False
    for part in parts:
        for k, v in part.items():
            if k is _NOTES:
                notes.extend(v)
                continue
            if k is _NULLABLE:
                nullable = nullable or bool(v)
                continue
            if k not in out:
                out[k] = v
                continue
            cur = out[k]
            if cur == v:
                continue
            if k == "type" and isinstance(cur, str) and isinstance(v, str):
                if {cur, v} == {"integer", "number"}:
                    out[k] = "integer"
                elif cur == "null" or v == "null":
                    out[k] = v if cur == "null" else cur
                else:
                    ctx.add(_key(path, "type"), APPROXIMATED, f"allOf combines conflicting types {cur!r} and {v!r}: kept {cur!r}")
            elif k == "properties" and isinstance(cur, dict) and isinstance(v, dict):
                merged = dict(cur)
                for name, sub in v.items():
                    merged[name] = {"allOf": [merged[name], sub]} if name in merged else sub
                out[k] = merged
            elif k == "required" and isinstance(cur, list) and isinstance(v, list):
                out[k] = cur + [x for x in v if x not in cur]
            elif k == "enum" and isinstance(cur, list) and isinstance(v, list):
                both = [x for x in cur if x in v]
                if both:
                    out[k] = both
                else:
                    ctx.add(_key(path, "enum"), APPROXIMATED, "allOf combines enums with no common value: kept the first one")
            elif k == "items" and isinstance(cur, (dict, bool)) and isinstance(v, (dict, bool)):
                out[k] = {"allOf": [cur, v]}
            elif k in ("description", "title") and isinstance(cur, str) and isinstance(v, str):
                out[k] = f"{cur} {v}"
            elif k == "additionalProperties" and (cur is False or v is False):
                out[k] = False
            elif k in ("minimum", "minItems", "minLength", "minProperties") and _is_num(cur) and _is_num(v):
                out[k] = max(cur, v)
            elif k in ("maximum", "maxItems", "maxLength", "maxProperties") and _is_num(cur) and _is_num(v):
                out[k] = min(cur, v)
            else:
                ctx.add(_key(path, k if isinstance(k, str) else "?"), APPROXIMATED,
                        f"allOf combines different values for {k!r}: kept {_show(cur, 40)}")
    if notes:
        out[_NOTES] = notes
    if nullable:
        out[_NULLABLE] = True
    return out


def _summary(flat: dict) -> str:
    kind = _kind(flat) or "any value"
    text = kind
    enum = flat.get("enum")
    if isinstance(enum, list) and enum:
        text += " " + "/".join(_show(v, 30) for v in enum[:6]) + ("/…" if len(enum) > 6 else "")
    props = flat.get("properties")
    names = list(props) if isinstance(props, dict) else []
    if not names and isinstance(flat.get("required"), list):
        names = [r for r in flat["required"] if isinstance(r, str)]
    if names:
        text += " with " + ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    fmt = flat.get("format")
    if isinstance(fmt, str):
        text += f" (format {fmt})"
    desc = flat.get("description") if isinstance(flat.get("description"), str) else flat.get("title")
    if isinstance(desc, str) and desc.strip():
        text += f": {desc.strip()}"
    return text if len(text) <= 160 else text[:159] + "…"


def _collapse_union(kw: str, branches: Any, base_kind: str | None, path: str, ctx: _Ctx, expanded: list[str]) -> dict:
    """anyOf / oneOf / a type array -> one flattened node (see the module docstring)."""
    where = _key(path, kw)
    if not isinstance(branches, list) or not branches:
        ctx.add(where, UNSUPPORTED, f"{kw} is not a non-empty list: ignored")
        return {}
    if kw == "type":
        flats = [{"type": t} for t in branches]
    else:
        flats = [_flatten(b, f"{where}[{i}]", ctx, expanded) for i, b in enumerate(branches)]
    nullable = False
    rest: list[tuple[str | None, dict]] = []
    for f in flats:
        k = _kind(f)
        if k == "null":
            nullable = True
            continue
        nullable = nullable or bool(f.get(_NULLABLE))
        rest.append((k, f))
    what = "type list" if kw == "type" else kw
    out: dict
    if not rest:
        out = {"type": "null"}
        ctx.add(where, APPROXIMATED, f"{what} allows only null")
    elif len(rest) == 1:
        out = dict(rest[0][1])
        if nullable:
            ctx.add(where, APPROXIMATED, f"{what} of one type and null: kept the type, 'may be null' noted in the description")
        else:
            ctx.add(where, MAPPED, f"{what} with a single alternative: unwrapped")
    else:
        typed = [k for k, _ in rest if k is not None]
        kinds = set(typed)
        alternatives = " | ".join(_summary(f) for _, f in rest)
        dropped_kinds: set[str] = set()
        if len(kinds) > 1 and not kinds <= {"integer", "number"} and base_kind in kinds:
            dropped_kinds = kinds - {base_kind}
            rest = [(k, f) for k, f in rest if k in (base_kind, None)]
            kinds = {base_kind}
        if len(kinds) > 1 and not kinds <= {"integer", "number"}:
            out = {"type": "string", _NOTES: [f"one of: {alternatives}"]}
            enums = [f.get("enum") for _, f in rest]
            if all(isinstance(e, list) for e in enums):
                out["enum"] = [v for e in enums for v in e]
            ctx.add(where, APPROXIMATED, f"{what} of {', '.join(sorted(kinds))}: the model sends a string; "
                                         "the alternatives are listed in the description")
        else:
            out = _union_same_kind(rest, kinds)
            kind = next(iter(kinds)) if len(kinds) == 1 else ("number" if kinds else None)
            plain = all({k for k in f if isinstance(k, str)} <= {"type", "enum"} for _, f in rest)
            if kind in ("object", None) or not plain or dropped_kinds:
                out.setdefault(_NOTES, []).append(f"one of: {alternatives}")
            detail = {
                "object": f"{what} of objects: properties merged, required = those every alternative requires",
                "array": f"{what} of arrays: items become the union of the alternatives' items",
            }.get(kind or "", f"{what} of {kind or 'untyped'} alternatives merged into one {kind or 'schema'}")
            if dropped_kinds:
                detail += f"; alternatives of type {', '.join(sorted(dropped_kinds))} dropped (only listed in the description)"
            ctx.add(where, APPROXIMATED, detail)
    if nullable and rest:
        out[_NULLABLE] = True
    return out


def _union_same_kind(rest: list[tuple[str | None, dict]], kinds: set[str]) -> dict:
    flats = [f for _, f in rest]
    out: dict = {}
    if kinds <= {"integer", "number"} and kinds:
        out["type"] = "number" if "number" in kinds else "integer"
    elif kinds:
        out["type"] = next(iter(kinds))
    kind = out.get("type")
    if kind == "object" or kind is None:
        props: dict = {}
        for f in flats:
            p = f.get("properties")
            if isinstance(p, dict):
                for name, sub in p.items():
                    if name in props:
                        existing = props[name]
                        props[name] = {"anyOf": (existing["anyOf"] if _is_union_wrapper(existing) else [existing]) + [sub]}
                    else:
                        props[name] = sub
        if props:
            out["properties"] = props
        reqs = [f.get("required") if isinstance(f.get("required"), list) else [] for f in flats]
        common = [r for r in reqs[0] if all(r in other for other in reqs[1:])]
        if common:
            out["required"] = list(dict.fromkeys(x for x in common if isinstance(x, str)))
        if all(f.get("additionalProperties") is False for f in flats):
            out["additionalProperties"] = False
    elif kind == "array":
        items = [f.get("items") for f in flats]
        if all(isinstance(i, (dict, bool)) for i in items):
            out["items"] = {"anyOf": items}
    if kind not in ("object", "array"):
        enums = [f.get("enum") for f in flats]
        if all(isinstance(e, list) for e in enums):
            out["enum"] = [v for e in enums for v in e]
    for k in ("minimum", "maximum", "pattern", "format", "minItems", "maxItems"):
        values = [f.get(k) for f in flats]
        if values[0] is not None and all(v == values[0] for v in values):
            out[k] = values[0]
    return out


def _is_union_wrapper(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"anyOf"} and isinstance(node["anyOf"], list)


def _deref(ref: Any, path: str, ctx: _Ctx, expanded: list[str]) -> dict:
    where = _key(path, "$ref")
    if not isinstance(ref, str):
        ctx.add(where, UNSUPPORTED, f"$ref {_show(ref, 40)} is not a string: ignored")
        return {}
    if ref in ctx.ref_stack:
        ok, target = _resolve_pointer(ctx.root, ref)
        kind = _guess_type(target) if ok else "string"
        ctx.add(where, APPROXIMATED, f"recursive $ref {ref!r} cut: the nested level is a free-form {kind}")
        return _cut_node(kind, f"recursive structure ({ref}) not expanded further")
    ok, target = _resolve_pointer(ctx.root, ref)
    if not ok:
        ctx.add(where, UNSUPPORTED, f"$ref {ref!r} does not resolve inside this schema: treated as unconstrained")
        return {}
    ctx.add(where, MAPPED, f"$ref {ref!r} inlined")
    ctx.ref_stack.append(ref)
    expanded.append(ref)
    try:
        return _flatten(target, path, ctx, expanded)
    finally:
        ctx.ref_stack.pop()


def _flatten(node: Any, path: str, ctx: _Ctx, expanded: list[str]) -> dict:
    """One schema node -> a dict without $ref/allOf/anyOf/oneOf/type arrays (children untouched)."""
    if ctx.over_budget(path):
        return {}
    if ctx.nesting >= MAX_NESTING:
        ctx.add(path, UNSUPPORTED, f"allOf/anyOf/oneOf/$ref nested more than {MAX_NESTING} deep: cut here (unconstrained)")
        return {}
    ctx.nesting += 1
    try:
        return _flatten_node(node, path, ctx, expanded)
    finally:
        ctx.nesting -= 1


def _flatten_node(node: Any, path: str, ctx: _Ctx, expanded: list[str]) -> dict:
    if node is True:
        return {}
    if node is False:
        ctx.add(path, APPROXIMATED, "false schema (no value allowed) treated as unconstrained")
        return {}
    if not isinstance(node, dict):
        ctx.add(path, UNSUPPORTED, f"not a schema ({_type_name(node)} {_show(node, 40)}): replaced by a free-form string")
        return {"type": "string"}
    own = dict(node)
    ref = own.pop("$ref", None) if "$ref" in own else None
    has_ref = "$ref" in node
    all_of = own.pop("allOf", None)
    unions: list[tuple[str, Any]] = []
    for kw in ("anyOf", "oneOf"):
        if kw in own:
            unions.append((kw, own.pop(kw)))
    t = own.get("type")
    if isinstance(t, list):
        own.pop("type")
        names = list(dict.fromkeys(x for x in t if isinstance(x, str)))
        if not names:
            ctx.add(_key(path, "type"), UNSUPPORTED, f"type list {_show(t, 40)} names no type: ignored")
        elif len(names) == 1:
            own["type"] = names[0]
            ctx.add(_key(path, "type"), MAPPED, "type list with a single type: unwrapped")
        else:
            unions.insert(0, ("type", names))
    if "const" in own:
        value = own.pop("const")
        if "enum" in own:
            ctx.add(_key(path, "const"), MAPPED, "const next to enum: the enum is kept")
        else:
            own["enum"] = [value]
            ctx.add(_key(path, "const"), MAPPED, "const becomes a single-value enum")
    if "nullable" in own:
        value = own.pop("nullable")
        if value is True:
            own[_NULLABLE] = True
            ctx.add(_key(path, "nullable"), APPROXIMATED, "nullable: 'may be null' noted in the description")
        else:
            ctx.add(_key(path, "nullable"), MAPPED, "nullable: false is the default: dropped")
    parts = [own]
    if has_ref:
        parts.append(_deref(ref, path, ctx, expanded))
    if all_of is not None:
        where = _key(path, "allOf")
        if isinstance(all_of, list) and all_of:
            parts.extend(_flatten(b, f"{where}[{i}]", ctx, expanded) for i, b in enumerate(all_of))
            ctx.add(where, MAPPED, "allOf merged into one schema")
        else:
            ctx.add(where, UNSUPPORTED, "allOf is not a non-empty list: ignored")
    base = _merge(parts, path, ctx) if len(parts) > 1 else own
    if not unions:
        return base
    base_kind = _kind(base)
    collapsed = [_collapse_union(kw, branches, base_kind, path, ctx, expanded) for kw, branches in unions]
    return _merge([base, *collapsed], path, ctx)


def _coerce_enum(values: list, kind: str, path: str, ctx: _Ctx) -> tuple[list | None, bool]:
    """Enum values usable for `kind` (None when none are); second item: a null was dropped."""
    where = _key(path, "enum")
    if kind in ("object", "array"):
        ctx.add(where, UNSUPPORTED, f"enum on an {kind} is not supported: dropped")
        return None, False
    out: list = []
    seen: set = set()
    dropped: list = []
    coerced = False
    had_null = False
    for v in values:
        if v is None:
            had_null = True
            continue
        cv: Any = None
        if kind == "string":
            if isinstance(v, str):
                cv = v
            elif _is_scalar(v):
                cv, coerced = json.dumps(v), True
        elif kind == "integer":
            if isinstance(v, int) and not isinstance(v, bool):
                cv = v
            elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
                cv = int(v)
        elif kind == "number":
            if _is_num(v):
                cv = v
        elif kind == "boolean":
            if isinstance(v, bool):
                cv = v
        if cv is None:
            dropped.append(v)
            continue
        marker = (type(cv).__name__, cv)
        if marker not in seen:
            seen.add(marker)
            out.append(cv)
    if coerced:
        ctx.add(where, APPROXIMATED, "non-string enum values on a string are sent as their JSON text")
    if dropped:
        ctx.add(where, UNSUPPORTED, f"enum values that are not {kind}s dropped: {_show(dropped, 60)}")
    if not out:
        if values and not (had_null and not dropped):
            ctx.add(where, UNSUPPORTED, "no usable enum value left: enum dropped")
        return None, had_null
    return out, had_null


def _infer_type(flat: dict) -> tuple[str, bool]:
    """(type, certain): inferred from the keywords present."""
    if any(k in flat for k in _OBJECT_HINTS):
        return "object", True
    if any(k in flat for k in _ARRAY_HINTS):
        return "array", True
    kind = _enum_kind(flat.get("enum"))
    if kind and kind != "null":
        return kind, True
    if any(_is_num(flat.get(k)) for k in _NUMBER_HINTS):
        return "number", True
    if any(k in flat for k in _STRING_HINTS):
        return "string", True
    return "string", False


def _note_value(v: Any) -> str:
    return _show(v, 60)


def _san(node: Any, path: str, ctx: _Ctx, depth: int) -> dict:
    if depth > MAX_DEPTH:
        kind = _guess_type(node) if isinstance(node, dict) else "string"
        ctx.add(path, UNSUPPORTED, f"nested deeper than {MAX_DEPTH} levels: cut here, the model sees a free-form {kind}")
        return {"type": kind, **({"properties": {}} if kind == "object" else {}),
                **({"items": {"type": "string"}} if kind == "array" else {})}
    expanded: list[str] = []
    flat = _flatten(node, path, ctx, expanded)
    ctx.ref_stack.extend(expanded)
    try:
        return _emit(flat, path, ctx, depth)
    finally:
        if expanded:
            del ctx.ref_stack[-len(expanded):]


def _emit(flat: dict, path: str, ctx: _Ctx, depth: int) -> dict:
    flat = dict(flat)
    notes: list[str] = list(flat.pop(_NOTES, []))
    nullable = bool(flat.pop(_NULLABLE, False))

    # type
    t = flat.get("type")
    if t is None:
        kind, certain = _infer_type(flat)
        if certain:
            ctx.add(_key(path, "type"), MAPPED, f"no type: {kind} inferred from the keywords present")
        else:
            ctx.add(_key(path, "type"), APPROXIMATED, "no type and nothing to infer it from: string assumed")
    elif isinstance(t, str) and t in TYPES:
        kind = t
    elif isinstance(t, str) and t == "null":
        kind = "string"
        notes.append("always null")
        ctx.add(_key(path, "type"), APPROXIMATED, "type null: sent as a string noted 'always null'")
    elif isinstance(t, str) and t in _TYPE_ALIASES:
        kind = _TYPE_ALIASES[t]
        ctx.add(_key(path, "type"), APPROXIMATED, f"type {t!r} is not a JSON Schema type: read as {kind!r}")
    else:
        kind, _ = _infer_type(flat)
        ctx.add(_key(path, "type"), UNSUPPORTED, f"unknown type {_show(t, 40)}: {kind} used instead")
    out: dict = {"type": kind}

    # description (+ title)
    desc = flat.get("description")
    if desc is not None and not isinstance(desc, str):
        ctx.add(_key(path, "description"), UNSUPPORTED, "description is not a string: dropped")
        desc = None
    title = flat.get("title")
    if "title" in flat:
        if isinstance(title, str) and title.strip() and not (desc and desc.strip()):
            desc = title
            ctx.add(_key(path, "title"), MAPPED, "title used as the description")
        else:
            ctx.add(_key(path, "title"), MAPPED, "title dropped (annotation)")

    handled = {"type", "description", "title"}

    # per-type keywords
    if kind == "object":
        handled |= {"properties", "required", "additionalProperties"}
        props = flat.get("properties")
        out_props: dict = {}
        if props is not None and not isinstance(props, dict):
            ctx.add(_key(path, "properties"), UNSUPPORTED, "properties is not an object: dropped")
        elif isinstance(props, dict):
            ppath = _key(path, "properties")
            for name, sub in props.items():
                if not isinstance(name, str):  # pragma: no cover - JSON keys are strings
                    continue
                if sub is False:
                    ctx.add(_key(ppath, name), APPROXIMATED, "property forbidden by a false schema: left out")
                    continue
                out_props[name] = _san(sub, _key(ppath, name), ctx, depth + 1)
        out["properties"] = out_props
        req = flat.get("required")
        if req is not None:
            if not isinstance(req, list):
                ctx.add(_key(path, "required"), UNSUPPORTED, "required is not a list: dropped")
            else:
                kept = list(dict.fromkeys(r for r in req if isinstance(r, str) and r in out_props))
                bad = [r for r in req if not (isinstance(r, str) and r in out_props)]
                if bad:
                    ctx.add(_key(path, "required"), MAPPED, f"required entries naming no property dropped: {_show(bad, 60)}")
                if kept:
                    out["required"] = kept
        ap = flat.get("additionalProperties")
        if isinstance(ap, bool):
            out["additionalProperties"] = ap
        elif ap is not None:
            ctx.add(_key(path, "additionalProperties"), APPROXIMATED, "schema for additional properties dropped: extra keys are unconstrained")
    elif kind == "array":
        handled |= {"items", "prefixItems", "minItems", "maxItems"}
        items = flat.get("items")
        ipath = _key(path, "items")
        if isinstance(items, list) or (items is None and isinstance(flat.get("prefixItems"), list)):
            tuple_items = items if isinstance(items, list) else flat["prefixItems"]
            if not items and "prefixItems" in flat:
                ipath = _key(path, "prefixItems")
            if tuple_items:
                ctx.add(ipath, APPROXIMATED, "tuple items: every item may be any of the positional schemas")
                out["items"] = _san({"anyOf": tuple_items}, ipath, ctx, depth + 1)
            else:
                ctx.add(ipath, APPROXIMATED, "empty tuple items: items assumed to be strings")
                out["items"] = {"type": "string"}
        elif items is None:
            ctx.add(ipath, APPROXIMATED, "array without items: items assumed to be strings")
            out["items"] = {"type": "string"}
        elif isinstance(items, (dict, bool)):
            out["items"] = _san(items, ipath, ctx, depth + 1)
        else:
            ctx.add(ipath, UNSUPPORTED, "items is not a schema: items assumed to be strings")
            out["items"] = {"type": "string"}
        _keep_bounds(flat, out, path, ctx, ("minItems", "maxItems"), _is_count, "a non-negative integer")
    elif kind == "string":
        handled |= {"pattern", "format", "minLength", "maxLength"}
        pattern = flat.get("pattern")
        if pattern is not None:
            if isinstance(pattern, str) and _compiles(pattern):
                out["pattern"] = pattern
            elif isinstance(pattern, str):
                notes.append(f"pattern: {pattern}")
                ctx.add(_key(path, "pattern"), APPROXIMATED, "pattern does not compile as a regular expression: moved into the description")
            else:
                ctx.add(_key(path, "pattern"), UNSUPPORTED, "pattern is not a string: dropped")
        fmt = flat.get("format")
        if fmt is not None:
            if isinstance(fmt, str) and fmt in SAFE_FORMATS:
                out["format"] = fmt
            elif isinstance(fmt, str):
                notes.append(f"format: {fmt}")
                ctx.add(_key(path, "format"), APPROXIMATED, f"format {fmt!r} is outside the safe set: moved into the description")
            else:
                ctx.add(_key(path, "format"), UNSUPPORTED, "format is not a string: dropped")
        for k, word in (("minLength", "at least {} characters"), ("maxLength", "at most {} characters")):
            if k in flat:
                v = flat[k]
                if _is_count(v):
                    notes.append(word.format(v))
                    ctx.add(_key(path, k), APPROXIMATED, f"{k} moved into the description")
                else:
                    ctx.add(_key(path, k), UNSUPPORTED, f"{k} is not a non-negative integer: dropped")
    elif kind in ("number", "integer"):
        handled |= {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
        _keep_bounds(flat, out, path, ctx, ("minimum", "maximum"), _is_num, "a finite number")
        for k, word in (("exclusiveMinimum", "greater than {}"), ("exclusiveMaximum", "less than {}"),
                        ("multipleOf", "a multiple of {}")):
            if k in flat:
                v = flat[k]
                if _is_num(v):
                    notes.append(word.format(_note_value(v)))
                    ctx.add(_key(path, k), APPROXIMATED, f"{k} moved into the description")
                elif isinstance(v, bool) and k != "multipleOf":
                    bound = "minimum" if k == "exclusiveMinimum" else "maximum"
                    if v and bound in out:
                        notes.append(f"{bound} {_note_value(out[bound])} excluded")
                    ctx.add(_key(path, k), APPROXIMATED, f"draft-4 boolean {k} moved into the description")
                else:
                    ctx.add(_key(path, k), UNSUPPORTED, f"{k} is not a finite number: dropped")

    # enum (every type)
    handled.add("enum")
    if "enum" in flat:
        values = flat["enum"]
        if not isinstance(values, list):
            ctx.add(_key(path, "enum"), UNSUPPORTED, "enum is not a list: dropped")
        else:
            kept, had_null = _coerce_enum(values, kind, path, ctx)
            if kept is not None:
                out["enum"] = kept
            if had_null:
                nullable = True
                ctx.add(_key(path, "enum"), APPROXIMATED, "null enum value dropped: 'may be null' noted in the description")

    # annotations worded into the description, the rest dropped
    for k in flat:
        if k in handled or not isinstance(k, str):
            continue
        v = flat[k]
        where = _key(path, k)
        if k in ("default", "example"):
            notes.append(f"{k}: {_note_value(v)}")
            ctx.add(where, APPROXIMATED, f"{k} moved into the description")
        elif k == "examples":
            shown = v[:2] if isinstance(v, list) else [v]
            if shown:
                notes.append("e.g. " + ", ".join(_note_value(x) for x in shown))
            ctx.add(where, APPROXIMATED, "examples moved into the description")
        elif k == "uniqueItems" and kind == "array":
            if v is True:
                notes.append("items must be unique")
                ctx.add(where, APPROXIMATED, "uniqueItems moved into the description")
            else:
                ctx.add(where, MAPPED, "uniqueItems: false is the default: dropped")
        elif k in ("minProperties", "maxProperties") and kind == "object":
            if _is_count(v):
                notes.append(f"{'at least' if k == 'minProperties' else 'at most'} {v} properties")
                ctx.add(where, APPROXIMATED, f"{k} moved into the description")
            else:
                ctx.add(where, UNSUPPORTED, f"{k} is not a non-negative integer: dropped")
        elif k in ("$defs", "definitions"):
            ctx.add(where, MAPPED, f"{k} inlined where referenced; the key itself is not sent")
        elif k in _IGNORED or k.startswith("x-"):
            ctx.add(where, MAPPED, f"annotation {k!r} dropped (no effect on the model)")
        elif k in _STRUCTURAL or k in _WORDED:
            ctx.add(where, MAPPED, f"{k!r} does not apply to a {kind}: dropped (no effect)")
        else:
            ctx.add(where, UNSUPPORTED, f"keyword {k!r} is outside the supported subset: dropped, the constraint is lost")

    if nullable:
        notes.append("may be null")
    if notes:
        notes = list(dict.fromkeys(notes))
        extra = "; ".join(notes)
        desc = f"{desc.rstrip()} ({extra})" if desc and desc.strip() else extra[:1].upper() + extra[1:]
    if desc is not None:
        out = {"type": out["type"], "description": desc, **{k: v for k, v in out.items() if k != "type"}}
    return out


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


def sanitize_schema(schema: Any, path: str) -> tuple[dict, list[Finding]]:
    """A JSON Schema -> the plain subset described in the module docstring; top level always an object.

    `None` (no schema) gives the empty parameter list. Raises ToolSchemaError when `schema` is not
    a schema at all (not an object or boolean)."""
    if schema is None or schema is True:
        return {"type": "object", "properties": {}}, []
    if schema is False:
        return {"type": "object", "properties": {}}, [
            Finding(path, UNSUPPORTED, "false schema (no arguments allowed) replaced by an empty parameter list")]
    if not isinstance(schema, dict):
        raise _error(path, schema, "a JSON Schema object such as {\"type\": \"object\", \"properties\": {...}}")
    ctx = _Ctx(schema)
    out = _san(schema, path, ctx, 0)
    if out["type"] != "object":
        ctx.add(path, APPROXIMATED,
                f"top-level schema is a {out['type']}, but function arguments are an object: wrapped as {{\"value\": ...}}")
        out = {"type": "object", "properties": {"value": out}, "required": ["value"]}
    return out, list(dict.fromkeys(ctx.findings))
