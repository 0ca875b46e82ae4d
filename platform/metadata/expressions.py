"""Where metadata meets the expression language: scopes, formula cycles, type checks.

The language itself lives in ``metacrm.metadata.expression``; this module knows
the bundle: it builds the scope an expression is checked against and finds
every expression a bundle contains (formulas, validation rules, stage entry
criteria, rule conditions).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from metacrm.metadata import fieldtypes
from metacrm.metadata.expression import (
    ExpressionError,
    FieldInfo,
    Scope,
    ValueType,
    check,
    parse,
    references,
)
from metacrm.metadata.model import EntityDef

SYSTEM_FIELD_TYPES = {
    "id": ValueType.UUID,
    "owner_id": ValueType.UUID,
    "team_id": ValueType.UUID,
    "created_by": ValueType.UUID,
    "updated_by": ValueType.UUID,
    "created_at": ValueType.DATETIME,
    "updated_at": ValueType.DATETIME,
}

RESULT_TYPES = {
    "text": ValueType.TEXT,
    "integer": ValueType.INTEGER,
    "decimal": ValueType.DECIMAL,
    "boolean": ValueType.BOOLEAN,
    "date": ValueType.DATE,
    "datetime": ValueType.DATETIME,
}


def value_type(f: Any) -> ValueType:
    """Return the expression type of a field definition."""
    if f.type == "formula":
        return RESULT_TYPES.get(f.get("result_type"), ValueType.TEXT)
    return ValueType[fieldtypes.get(f.type).value_type]


def scope_for(entities: Mapping[str, EntityDef], name: str, depth: int = 1) -> Scope:
    """Return the scope of one entity: its fields, system columns and one lookup hop."""
    entity = entities[name]
    fields: dict[str, FieldInfo] = {n: FieldInfo(t) for n, t in SYSTEM_FIELD_TYPES.items()}
    for f in entity.active_fields():
        if f.type not in fieldtypes.names() or f.type == "related_to":
            # A related-to value is two columns (entity, id): not one comparable value.
            continue
        if depth == 0 and f.type == "formula":
            # One hop reaches stored columns only; formulas of the target are not inlined.
            continue
        target = None
        if f.type == "lookup" and depth > 0 and f.get("target") in entities:
            target = scope_for(entities, f.get("target"), depth - 1)
        filterable = f.type not in ("many_to_many", "json", "file", "encrypted_text")
        fields[f.name] = FieldInfo(value_type(f), target=target, filterable=filterable)
    return Scope(entity=name, fields=fields)


def _position_hint(error: ExpressionError) -> str:
    return f"line {error.line}, column {error.column}"


def check_expression(
    text: str, entities: Mapping[str, EntityDef], entity: str, want: ValueType | None
) -> tuple[str, str | None] | None:
    """Parse and type-check one expression; return (message, hint) when it is wrong."""
    try:
        node = parse(text)
        result = check(node, scope_for(entities, entity))
    except ExpressionError as exc:
        return f"expression error at {_position_hint(exc)}: {exc.message}", None
    if want is not None and result not in (want, ValueType.NULL):
        numeric = {ValueType.INTEGER, ValueType.DECIMAL}
        if not (want in numeric and result in numeric):
            return (f"expression gives {result.name.lower()}, expected {want.name.lower()}", None)
    return None


def _formula_cycles(entities: Mapping[str, EntityDef]) -> Iterator[tuple[str, str, list[str]]]:
    """Yield (entity, field, cycle path) for formula fields that depend on themselves."""
    edges: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for entity in entities.values():
        for f in entity.fields.values():
            if f.type != "formula" or not isinstance(f.get("expression"), str):
                continue
            try:
                refs = references(parse(f.get("expression")))
            except ExpressionError:
                continue
            deps = []
            for path in refs:
                if len(path) == 1:
                    deps.append((entity.name, path[0]))
                else:
                    lookup = entity.fields.get(path[0])
                    if lookup is not None and lookup.get("target") in entities:
                        deps.append((lookup.get("target"), path[1]))
            edges[(entity.name, f.name)] = [
                d for d in deps if d in edges or _is_formula(entities, d)
            ]
    reported: set[tuple[str, str]] = set()
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, []):
                if nxt == start:
                    if start not in reported:
                        reported.update(path)
                        yield start[0], start[1], [f"{e}.{n}" for e, n in [*path, start]]
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))


def _is_formula(entities: Mapping[str, EntityDef], ref: tuple[str, str]) -> bool:
    entity = entities.get(ref[0])
    f = entity.fields.get(ref[1]) if entity else None
    return f is not None and f.type == "formula"


def check_bundle_expressions(
    doc: Mapping[str, Any],
    positions: Mapping[str, list[int]],
    entities: Mapping[str, EntityDef],
    field_pointers: Mapping[tuple[str, str], str],
) -> Iterator[tuple[str, str, str | None]]:
    """Yield (pointer, message, hint) for every expression in the bundle that is wrong."""

    def at(kind: str, index: int) -> str:
        return f"/{kind}/{positions[kind][index]}"

    cyclic = set()
    for entity_name, field_name, path in _formula_cycles(entities):
        cyclic.add((entity_name, field_name))
        where = field_pointers.get((entity_name, field_name))
        if where:
            yield (
                f"{where}/expression",
                "formula fields refer to each other in a cycle: " + " → ".join(path),
                None,
            )
    for i, edoc in enumerate(doc.get("entities", [])):
        name = edoc["name"]
        entity = entities.get(name)
        if entity is None or entity.doc is not edoc:
            continue
        for fdoc in entity.doc["fields"]:
            where = field_pointers.get((name, fdoc["name"]))
            if fdoc.get("type") == "formula" and where and (name, fdoc["name"]) not in cyclic:
                want = RESULT_TYPES.get(fdoc.get("result_type"))
                problem = check_expression(fdoc.get("expression", ""), entities, name, want)
                if problem:
                    yield (f"{where}/expression", *problem)
        for j, rule in enumerate(entity.doc.get("validation_rules", [])):
            problem = check_expression(rule["expression"], entities, name, ValueType.BOOLEAN)
            if problem:
                yield (f"{at('entities', i)}/validation_rules/{j}/expression", *problem)
    for i, pdoc in enumerate(doc.get("pipelines", [])):
        if pdoc.get("entity") not in entities:
            continue
        for s, stage in enumerate(pdoc.get("stages", [])):
            if "entry_criteria" in stage:
                problem = check_expression(
                    stage["entry_criteria"], entities, pdoc["entity"], ValueType.BOOLEAN
                )
                if problem:
                    yield (f"{at('pipelines', i)}/stages/{s}/entry_criteria", *problem)
    for i, rdoc in enumerate(doc.get("rules", [])):
        if rdoc.get("entity") in entities and "condition" in rdoc:
            problem = check_expression(
                rdoc["condition"], entities, rdoc["entity"], ValueType.BOOLEAN
            )
            if problem:
                yield (f"{at('rules', i)}/condition", *problem)
