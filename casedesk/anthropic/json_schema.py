"""JSON Schemas a client sends (tool `input_schema`, `output_config.format.schema`): what
llama-server can safely turn into a grammar, and what its grammar really enforces.

Two checks, both pure and both raising a 400 that names the path:
- `check_schema_bounds`: every tool schema, before it reaches llama-server's
  schema-to-grammar converter (common/json-schema-to-grammar.cpp), which recurses over the
  schema and expands repetitions into rules: bounded nesting, size, `pattern` length and
  repetition counts; only local `$ref`s (the converter would try a remote `https://` one),
  and none that refers back to itself.
- `check_grammar_schema`: a schema whose answers must validate (structured outputs, strict
  tools). The converter silently ignores what it cannot express (`not`, `uniqueItems`,
  `minimum` on a `number`, a `format` it has no rule for, constraints beside a `$ref`...),
  so each node is read the way its `visit()` reads it, and a constraint the chosen branch
  drops is refused instead of answered unconstrained. docs/llama-server-facts.md §13 lists
  the branches.

`check_json_depth` bounds the nesting of any JSON value CaseDesk forwards: orjson parses
1024 levels but encodes only 254, so a deeper value would fail when the request is sent.
"""

from __future__ import annotations

from typing import Any

from casedesk.anthropic.errors import ApiError, invalid_request

MAX_JSON_DEPTH = 128  # levels of nesting in any forwarded JSON value (orjson encodes 254)
MAX_SCHEMA_DEPTH = 32  # nested subschemas
MAX_SCHEMA_NODES = 2000  # subschemas in one schema
MAX_PATTERN_LENGTH = 1000  # characters in one `pattern`
MAX_REPETITION = 1000  # minItems / maxItems / minLength / maxLength the grammar expands

# Keywords that constrain nothing: any branch may carry them.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "$schema",
        "$id",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
        "contentMediaType",
        "contentEncoding",
        "discriminator",  # an OpenAPI hint pydantic adds to unions
        "strict",
    }
)
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
# Formats the converter has a rule for (STRING_FORMAT_RULES, and uuid).
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
SUBSCHEMA_VALUES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
REPETITIONS = ("minItems", "maxItems", "minLength", "maxLength")


def check_json_depth(value: Any, path: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse a value nested deeper than `limit` (iterative: no recursion limit to hit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise invalid_request(f"{path}: JSON nested more than {limit} levels deep")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def without_long_repetitions(schema: Any) -> Any:
    """`schema` without the length and count bounds above MAX_REPETITION (the grammar would
    expand each into that many rules). For a tool that is not strict, whose input the API does
    not promise to validate: Claude Code's own tools carry `maxLength` in the tens of thousands,
    and refusing them would refuse Claude Code. The same object when there is none to drop."""
    if isinstance(schema, list):
        items = [without_long_repetitions(item) for item in schema]
        return schema if all(a is b for a, b in zip(items, schema, strict=True)) else items
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] | None = None
    for key, value in schema.items():
        if key in REPETITIONS and _is_int(value) and value > MAX_REPETITION:
            kept = out if out is not None else dict(schema)
            del kept[key]
            out = kept
            continue
        if isinstance(value, (dict, list)):
            relaxed = without_long_repetitions(value)
            if relaxed is not value:
                out = out if out is not None else dict(schema)
                out[key] = relaxed
    return schema if out is None else out


def check_schema_bounds(schema: Any, path: str) -> None:
    """What keeps llama-server's schema-to-grammar converter safe (see the module doc)."""
    check_json_depth(schema, path)
    if not isinstance(schema, dict):
        raise invalid_request(f"{path}: must be a JSON Schema object")
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(schema, path, 1)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # `true`/`false` schemas and malformed values the converter skips
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise invalid_request(f"{path}: more than {MAX_SCHEMA_NODES} subschemas")
        if depth > MAX_SCHEMA_DEPTH:
            raise invalid_request(f"{where}: subschemas nested more than {MAX_SCHEMA_DEPTH} deep")
        pattern = node.get("pattern")
        if pattern is not None and (not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_LENGTH):
            raise invalid_request(f"{where}.pattern: must be a string of at most {MAX_PATTERN_LENGTH} characters")
        for key in REPETITIONS:
            count = node.get(key)
            if count is not None and (not _is_int(count) or not 0 <= count <= MAX_REPETITION):
                raise invalid_request(f"{where}.{key}: must be an integer from 0 to {MAX_REPETITION}")
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
            raise invalid_request(f"{where}.$ref: only local references (#/$defs/...) are supported, got {ref!r}")
        stack.extend((child, child_path, depth + 1) for child, child_path in _subschemas(node, where))
    _check_refs(schema, path)


def check_grammar_schema(schema: Any, path: str) -> None:
    """Refuse a schema whose answers llama-server's grammar would not hold to it.

    Assumes `check_schema_bounds` passed (depth bounded, refs local and acyclic)."""
    grammar = _Grammar()
    grammar.visit(schema, path)
    # Definitions are visited where they are defined (the converter hoists nested ones).
    stack: list[tuple[Any, str]] = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        for key in ("$defs", "definitions"):
            defs = node.get(key)
            if isinstance(defs, dict):
                for name, child in defs.items():
                    grammar.visit(child, f"{where}.{key}.{name}")
        stack.extend(_subschemas(node, where))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _subschemas(node: dict[str, Any], where: str) -> list[tuple[Any, str]]:
    out: list[tuple[Any, str]] = []
    for key in SUBSCHEMA_LISTS:
        value = node.get(key)
        if isinstance(value, list):
            out.extend((child, f"{where}.{key}.{i}") for i, child in enumerate(value))
    for key in SUBSCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            out.extend((child, f"{where}.{key}.{name}") for name, child in value.items())
    for key in SUBSCHEMA_VALUES:
        value = node.get(key)
        if isinstance(value, list):  # `items` as a tuple (draft 4)
            out.extend((child, f"{where}.{key}.{i}") for i, child in enumerate(value))
        elif value is not None:
            out.append((value, f"{where}.{key}"))
    return out


def _resolve(root: dict[str, Any], ref: str, where: str) -> Any:
    """The subschema a local `$ref` (a JSON pointer after `#`) names."""
    target: Any = root
    pointer = ref[1:]
    for raw in pointer.split("/")[1:] if pointer else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and token in target:
            target = target[token]
        elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
            target = target[int(token)]
        else:
            raise invalid_request(f"{where}.$ref: {ref!r} does not resolve within the schema")
    return target


def _check_refs(root: dict[str, Any], path: str) -> None:
    """Every `$ref` resolves, and no chain of them leads back to a schema it came from."""
    refs: dict[str, str] = {}  # ref → where it first appears
    edges: dict[str, set[str]] = {}  # ref → the refs inside the schema it names
    stack: list[tuple[Any, str]] = [(root, path)]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str):
            refs.setdefault(ref, where)
        stack.extend(_subschemas(node, where))
    for ref, where in refs.items():
        target = _resolve(root, ref, where)
        if not isinstance(target, (dict, bool)):
            raise invalid_request(f"{where}.$ref: {ref!r} does not name a schema")
        edges[ref] = _refs_within(target)
    # A cycle through the ref graph (depth-first, with colours).
    state: dict[str, int] = {}
    for start in edges:
        if state.get(start):
            continue
        walk: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        state[start] = 1
        while walk:
            ref, pending = walk[-1]
            if not pending:
                state[ref] = 2
                walk.pop()
                continue
            nxt = pending.pop()
            if state.get(nxt) == 1:
                raise invalid_request(f"{refs[nxt]}.$ref: recursive schema ({nxt!r} refers back to itself)")
            if not state.get(nxt):
                state[nxt] = 1
                walk.append((nxt, sorted(edges.get(nxt, ()))))


def _refs_within(schema: Any) -> set[str]:
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref)
        stack.extend(child for child, _ in _subschemas(node, ""))
    return found


class _Grammar:
    """Reads each node as the converter's `visit()` does, in its order of branches."""

    def visit(self, node: Any, where: str) -> None:
        if node is True or node == {}:
            return  # any value
        if not isinstance(node, dict):
            raise invalid_request(f"{where}: must be a JSON Schema object")
        kind = node.get("type")
        if "$ref" in node:
            self._only(node, where, {"$ref"}, "beside $ref")
            return  # the target is visited where it is defined ($defs) or below
        if "anyOf" in node or "oneOf" in node:
            key = "oneOf" if "oneOf" in node else "anyOf"
            alternatives = node[key]
            if not isinstance(alternatives, list) or not alternatives:
                raise invalid_request(f"{where}.{key}: must be a non-empty list of schemas")
            # oneOf is matched as anyOf (an answer may fit two alternatives).
            self._only(node, where, {key, "type"}, f"beside {key}")
            for i, alternative in enumerate(alternatives):
                self.visit(alternative, f"{where}.{key}.{i}")
            return
        if isinstance(kind, list):
            if not kind or not all(isinstance(t, str) and t in TYPES for t in kind):
                raise invalid_request(f"{where}.type: must name JSON types ({', '.join(sorted(TYPES))})")
            for t in kind:
                self._typed({**node, "type": t}, where, t)
            return
        if kind is not None and (not isinstance(kind, str) or kind not in TYPES):
            raise invalid_request(f"{where}.type: unknown type {kind!r} (one of {', '.join(sorted(TYPES))})")
        self._typed(node, where, kind)

    def _typed(self, node: dict[str, Any], where: str, kind: str | None) -> None:
        if "const" in node:
            self._only(node, where, {"const", "type"}, "beside const")
            return
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise invalid_request(f"{where}.enum: must be a non-empty list")
            self._only(node, where, {"enum", "type"}, "beside enum")
            return
        closed = "additionalProperties" in node and node["additionalProperties"] is not True
        if kind in (None, "object") and ("properties" in node or closed):
            self._object(node, where)
            return
        if kind in (None, "object", "string") and "allOf" in node:
            self._all_of(node, where)
            return
        if kind in (None, "array") and ("items" in node or "prefixItems" in node):
            self._array(node, where)
            return
        if kind in (None, "string") and "pattern" in node:
            self._pattern(node["pattern"], f"{where}.pattern")
            self._only(node, where, {"pattern", "type"}, "beside pattern")
            return
        if kind in (None, "string") and "format" in node:
            fmt = node["format"]
            if not isinstance(fmt, str) or fmt not in FORMATS:
                supported = ", ".join(sorted(FORMATS))
                raise invalid_request(f"{where}.format: {fmt!r} cannot be enforced by the grammar ({supported} can)")
            self._only(node, where, {"format", "type"}, "beside format")
            return
        if kind == "string":
            self._only(node, where, {"type", "minLength", "maxLength"}, "for a string")
            return
        if kind == "integer":
            bounds = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
            for key in bounds & node.keys():
                if not _is_int(node[key]):
                    raise invalid_request(f"{where}.{key}: must be an integer for an integer")
            if "minimum" in node and "exclusiveMinimum" in node or "maximum" in node and "exclusiveMaximum" in node:
                raise invalid_request(f"{where}: give minimum or exclusiveMinimum (maximum or its exclusive), not both")
            self._only(node, where, {"type"} | bounds, "for an integer")
            return
        if kind is None and node.keys() - ANNOTATIONS:
            self._only(node, where, set(), "in a schema without a type")
            return
        if kind == "object" and node.get("additionalProperties") is True:
            self._only(node, where, {"type", "additionalProperties"}, "for an object")
            return
        self._only(node, where, {"type"}, f"for type {kind}")

    def _object(self, node: dict[str, Any], where: str) -> None:
        self._only(node, where, {"type", "properties", "required", "additionalProperties"}, "for an object")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise invalid_request(f"{where}.properties: must be an object of schemas")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise invalid_request(f"{where}.required: must be a list of property names")
        for name, child in properties.items():
            self.visit(child, f"{where}.properties.{name}")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            self.visit(extra, f"{where}.additionalProperties")
        elif extra is not None and not isinstance(extra, bool):
            raise invalid_request(f"{where}.additionalProperties: must be a boolean or a schema")

    def _all_of(self, node: dict[str, Any], where: str) -> None:
        # The converter merges only the properties (or $ref targets, or enums) of allOf's parts.
        self._only(node, where, {"type", "allOf"}, "beside allOf")
        parts = node["allOf"]
        if not isinstance(parts, list) or not parts:
            raise invalid_request(f"{where}.allOf: must be a non-empty list of schemas")
        for i, part in enumerate(parts):
            at = f"{where}.allOf.{i}"
            if not isinstance(part, dict):
                raise invalid_request(f"{at}: must be a JSON Schema object")
            if "$ref" in part:
                self.visit(part, at)
            elif "properties" in part:
                self._object(part, at)
            elif "enum" in part:
                self.visit(part, at)
            else:
                raise invalid_request(f"{at}: allOf merges only properties, enums and $refs")

    def _array(self, node: dict[str, Any], where: str) -> None:
        items = node.get("items", node.get("prefixItems"))
        if "items" in node and "prefixItems" in node:
            raise invalid_request(f"{where}: items beside prefixItems cannot be enforced by the grammar")
        if isinstance(items, list):
            self._only(node, where, {"type", "items", "prefixItems"}, "for a tuple")
            key = "items" if "items" in node else "prefixItems"
            for i, child in enumerate(items):
                self.visit(child, f"{where}.{key}.{i}")
            return
        self._only(node, where, {"type", "items", "prefixItems", "minItems", "maxItems"}, "for an array")
        self.visit(items, f"{where}.items")

    def _pattern(self, pattern: Any, where: str) -> None:
        if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
            raise invalid_request(f"{where}: the grammar needs a pattern anchored with ^ and $")

    def _only(self, node: dict[str, Any], where: str, allowed: set[str], context: str) -> None:
        ignored = sorted(node.keys() - allowed - ANNOTATIONS)
        if ignored:
            raise unsupported(where, ignored, context)


def unsupported(where: str, keywords: list[str], context: str) -> ApiError:
    named = ", ".join(keywords)
    return invalid_request(
        f"{where}: {named} {context} cannot be enforced by llama-server's grammar; "
        "remove it or describe the constraint in the prompt"
    )
