"""Validate a bundle and report every problem at once.

Two passes: the JSON Schemas check the shape of each document; semantic checks
then look across documents (names unique, references resolve, options fit the
type, expressions type-check). A document with shape errors is left out of the
semantic pass, so one typo does not bury the report under follow-on errors.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from metacrm.metadata import fieldtypes, schemas
from metacrm.metadata.expressions import check_bundle_expressions
from metacrm.metadata.fieldtypes import COMMON_KEYS, ValueProblem
from metacrm.metadata.identifiers import MAX_LENGTH as MAX_IDENTIFIER
from metacrm.metadata.identifiers import RESERVED, SYSTEM_COLUMNS, identifier_problem
from metacrm.metadata.model import DOCUMENT_LISTS, Bundle, EntityDef, FieldDef
from metacrm.metadata.tables import link_table_name

MAX_MESSAGE = 300
MAX_DEPTH = 64
PLATFORM_TABLE_PREFIX = "_"
SYSTEM_SORTABLE = ("created_at", "updated_at", "owner_id")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a bundle: where (a JSON pointer), what, and how to fix it."""

    pointer: str
    message: str
    hint: str | None = None

    def to_dict(self) -> dict[str, str]:
        """Return the problem as the API and CLI show it."""
        result = {"pointer": self.pointer, "message": self.message}
        if self.hint:
            result["hint"] = self.hint
        return result


class BundleInvalid(Exception):
    """Raised with the full list of problems when a bundle cannot be used."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s) in the metadata")
        self.problems = problems


def pointer(*parts: object) -> str:
    """Return a JSON pointer (RFC 6901) to the given path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _short(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _schema_problem(error: schemas.SchemaError) -> Problem:
    """Turn a schema violation into a problem a person can act on (never echoing a huge value)."""
    path = list(error.path)
    if error.keyword == "Not" and path:
        # The schemas refuse keys that do not apply to a field type with {"not": {}}.
        return Problem(pointer(*path), f"'{path[-1]}' does not apply here")
    if error.keyword == "AdditionalProperties" and len(error.unexpected) == 1:
        key = error.unexpected[0]
        return Problem(pointer(*path, key), f"unknown key '{_short(key)}'")
    if error.keyword == "MaxLength":
        return Problem(pointer(*path), f"is longer than {error.limit} characters")
    if error.keyword == "MaxItems":
        return Problem(pointer(*path), f"has more than {error.limit} items")
    if error.keyword == "MaxProperties":
        return Problem(pointer(*path), f"has more than {error.limit} keys")
    return Problem(pointer(*path), _short(error.message))


def schema_problems(doc: Any, kind: str = "bundle") -> list[Problem]:
    """Return the JSON Schema violations of one document, sorted by position."""
    problems = [_schema_problem(error) for error in schemas.iter_errors(kind, doc)]
    return sorted(problems, key=lambda p: p.pointer)


def _too_deep(doc: Any, limit: int) -> bool:
    """Tell whether ``doc`` nests deeper than ``limit``, without recursion."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def _broken_parts(problems: list[Problem]) -> tuple[set[str], dict[str, set[int]]]:
    """Split schema problems into broken documents and broken fields of entities."""
    documents: set[str] = set()
    fields: dict[str, set[int]] = {}
    for problem in problems:
        parts = problem.pointer.split("/")[1:]
        if len(parts) >= 4 and parts[0] == "entities" and parts[2] == "fields":
            if parts[3].isdigit():
                fields.setdefault(parts[1], set()).add(int(parts[3]))
                continue
        if parts and parts[0] in ("settings", "branding"):
            documents.add(parts[0])
        elif len(parts) >= 2:
            documents.add(f"{parts[0]}/{parts[1]}")
        elif parts:
            documents.add(parts[0])
    return documents, fields


def validate_bundle(doc: Any) -> list[Problem]:
    """Return every problem of a bundle document; an empty list means it can be planned."""
    if _too_deep(doc, MAX_DEPTH):
        return [Problem("", f"the bundle nests deeper than {MAX_DEPTH} levels")]
    problems = schema_problems(doc)
    if not isinstance(doc, Mapping) or any(
        not isinstance(doc.get(k, []), list) for k in DOCUMENT_LISTS
    ):
        return problems
    broken, broken_fields = _broken_parts(problems)
    checker = _SemanticChecker(doc, broken, broken_fields)
    problems.extend(checker.run())
    return problems


def require_valid(doc: Any) -> Bundle:
    """Return the Bundle of a valid document, or raise BundleInvalid with every problem."""
    problems = validate_bundle(doc)
    if problems:
        raise BundleInvalid(problems)
    return Bundle.from_doc(doc)


class _SemanticChecker:
    """Cross-document checks over the documents that passed their schema."""

    def __init__(
        self, raw: Mapping[str, Any], broken: set[str], broken_fields: dict[str, set[int]]
    ) -> None:
        self.problems: list[Problem] = []
        self.positions: dict[str, list[int]] = {}
        self.doc: dict[str, Any] = {k: v for k, v in raw.items() if k not in DOCUMENT_LISTS}
        self.broken_settings = "settings" in broken
        #: Names of every document with a string name, broken or not: references to a
        #: broken document are not reported again as unknown.
        self.names: dict[str, set[str]] = {}
        #: Fields left out of the semantic pass because their own shape is wrong.
        self.skipped_fields: dict[str, set[str]] = {}
        #: Original positions of the fields kept, per entity (by position in ``doc``).
        self.field_positions: dict[int, list[int]] = {}
        #: Pointer of every field checked, for messages found by later passes.
        self.field_pointers: dict[tuple[str, str], str] = {}
        for kind in DOCUMENT_LISTS:
            key = "entity" if kind == "layouts" else "name"
            documents = raw.get(kind, [])
            self.names[kind] = {
                d[key] for d in documents if isinstance(d, Mapping) and isinstance(d.get(key), str)
            }
            clean: list[Mapping[str, Any]] = []
            self.positions[kind] = []
            for i, d in enumerate(documents):
                if f"{kind}/{i}" in broken or not isinstance(d, Mapping):
                    continue
                if kind == "entities" and str(i) in broken_fields:
                    bad = broken_fields[str(i)]
                    fields = d.get("fields", [])
                    self.skipped_fields[d["name"]] = {
                        str(f.get("name"))
                        for j, f in enumerate(fields)
                        if j in bad and isinstance(f, Mapping)
                    }
                    d = {**d, "fields": [f for j, f in enumerate(fields) if j not in bad]}
                    self.field_positions[len(clean)] = [
                        j for j in range(len(fields)) if j not in bad
                    ]
                clean.append(d)
                self.positions[kind].append(i)
            self.doc[kind] = clean
        self.entities: dict[str, EntityDef] = {}

    def add(self, where: str, message: str, hint: str | None = None) -> None:
        self.problems.append(Problem(where, message, hint))

    def at(self, kind: str, index: int, *rest: object) -> str:
        return pointer(kind, self.positions[kind][index], *rest)

    def run(self) -> list[Problem]:
        self.check_entities()
        self.check_layouts()
        self.check_pipelines()
        self.check_roles()
        self.check_rules()
        self.check_settings()
        # Expressions of an entity with a broken field would only report that field
        # again as unknown, so they wait until the field is fixed.
        complete = {n: e for n, e in self.entities.items() if n not in self.skipped_fields}
        for where, message, hint in check_bundle_expressions(
            self.doc, self.positions, complete, self.field_pointers
        ):
            self.add(where, message, hint)
        return self.problems

    # -- names --------------------------------------------------------------------------

    def name_ok(self, where: str, name: Any, what: str) -> bool:
        problem = identifier_problem(name)
        if problem:
            hint = None
            if isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name.lower(), re.ASCII):
                hint = f"try '{name.lower()}_'" if name in RESERVED else None
            self.add(where, f"{what} name {name!r} {problem}", hint)
            return False
        return True

    # -- entities and fields --------------------------------------------------------------

    def check_entities(self) -> None:
        seen: dict[str, str] = {}
        table_names: dict[str, str] = {}
        for i, doc in enumerate(self.doc["entities"]):
            where = self.at("entities", i)
            name = doc["name"]
            if not self.name_ok(where + "/name", name, "entity"):
                continue
            if name in seen:
                self.add(
                    where + "/name", f"entity '{name}' is defined twice", f"first at {seen[name]}"
                )
                continue
            seen[name] = where
            table_names[name] = where
            self.entities[name] = EntityDef.from_doc(doc)
        for i, doc in enumerate(self.doc["entities"]):
            entity = self.entities.get(doc["name"])
            if entity is None or entity.doc is not doc:
                continue
            where = self.at("entities", i)
            self.check_entity(entity, where, table_names, self.field_positions.get(i))

    def check_entity(
        self,
        entity: EntityDef,
        where: str,
        table_names: dict[str, str],
        positions: list[int] | None,
    ) -> None:
        columns: dict[str, str] = {name: "(system column)" for name in SYSTEM_COLUMNS}
        field_names: set[str] = set(self.skipped_fields.get(entity.name, ()))
        for j, fdoc in enumerate(entity.doc["fields"]):
            fwhere = f"{where}/fields/{positions[j] if positions else j}"
            self.field_pointers.setdefault((entity.name, fdoc["name"]), fwhere)
            fname = fdoc["name"]
            if not self.name_ok(fwhere + "/name", fname, "field"):
                continue
            if fname in field_names:
                self.add(fwhere + "/name", f"field '{fname}' is defined twice in '{entity.name}'")
                continue
            field_names.add(fname)
            f = FieldDef(entity.name, fdoc)
            self.check_field(entity, f, fwhere)
            try:
                ft = fieldtypes.get(f.type)
            except KeyError:
                continue
            for column in ft.column_names(f):
                if len(column) > MAX_IDENTIFIER:
                    self.add(
                        fwhere + "/name",
                        f"field '{fname}' needs a column '{column}', "
                        f"longer than {MAX_IDENTIFIER} characters; use a shorter name",
                    )
                if column in columns and columns[column] != fname:
                    self.add(
                        fwhere + "/name",
                        f"field '{fname}' needs a column '{column}', which field "
                        f"'{columns[column]}' already uses",
                    )
                columns[column] = fname
            if f.type == "many_to_many":
                link = link_table_name(entity.name, fname)
                if len(link) > MAX_IDENTIFIER:
                    self.add(
                        fwhere + "/name",
                        f"the link table '{link}' of this relation is "
                        f"longer than {MAX_IDENTIFIER} characters; use shorter names",
                    )
                if link in table_names:
                    self.add(
                        fwhere + "/name",
                        f"the link table '{link}' of this field clashes "
                        f"with another table of the same name",
                    )
                table_names[link] = fwhere
        skipped = self.skipped_fields.get(entity.name, set())
        title = entity.doc["title_field"]
        title_field = entity.fields.get(title)
        if title_field is None and title in skipped:
            pass  # the field's own problem is reported already
        elif title_field is None:
            self.add(
                where + "/title_field",
                f"title field '{title}' is not a field of '{entity.name}'",
                _did_you_mean(title, entity.fields),
            )
        elif title_field.type not in fieldtypes.names() or not (
            fieldtypes.get(title_field.type).text_like
        ):
            self.add(
                where + "/title_field",
                f"title field '{title}' must be a text-like field, not {title_field.type}",
            )
        for k, name in enumerate(entity.doc.get("search_fields", [])):
            f = entity.fields.get(name)
            if f is None and name in skipped:
                continue
            if f is None:
                self.add(
                    f"{where}/search_fields/{k}",
                    f"search field '{name}' is not a field of '{entity.name}'",
                    _did_you_mean(name, entity.fields),
                )
            elif f.type in fieldtypes.names() and not fieldtypes.get(f.type).text_like:
                self.add(
                    f"{where}/search_fields/{k}",
                    f"search field '{name}' must be text-like, not {f.type}",
                )
        index_names: set[str] = set()
        for k, spec in enumerate(entity.doc.get("indexes", [])):
            iwhere = f"{where}/indexes/{k}"
            if not self.name_ok(iwhere + "/name", spec["name"], "index"):
                continue
            if spec["name"] in entity.fields:
                self.add(
                    iwhere + "/name",
                    f"index name '{spec['name']}' is also a field name; "
                    "the field's own index would clash with it",
                )
            if spec["name"] in index_names:
                self.add(iwhere + "/name", f"index '{spec['name']}' is defined twice")
            index_names.add(spec["name"])
            for m, name in enumerate(spec["fields"]):
                f = entity.fields.get(name)
                if f is None and name not in SYSTEM_SORTABLE:
                    self.add(
                        f"{iwhere}/fields/{m}",
                        f"index field '{name}' is not a field of '{entity.name}'",
                        _did_you_mean(name, entity.fields),
                    )
                elif (
                    f is not None
                    and f.type in fieldtypes.names()
                    and not (fieldtypes.get(f.type).stored and fieldtypes.get(f.type).indexable)
                ):
                    self.add(f"{iwhere}/fields/{m}", f"a {f.type} field cannot be indexed")

    def check_field(self, entity: EntityDef, f: FieldDef, where: str) -> None:
        try:
            ft = fieldtypes.get(f.type)
        except KeyError:
            self.add(
                where + "/type",
                f"unknown field type {f.type!r}",
                _did_you_mean(f.type, fieldtypes.names()),
            )
            return
        for key in f.doc:
            if key not in COMMON_KEYS and key not in ft.keys:
                self.add(f"{where}/{key}", f"'{key}' does not apply to a field of type {f.type}")
        if (f.unique or f.indexed) and not (ft.stored and ft.indexable):
            which = "unique" if f.unique else "indexed"
            self.add(f"{where}/{which}", f"a {f.type} field cannot be {which}")
        if f.type in ("formula", "many_to_many", "auto_number") and f.has_default:
            self.add(where + "/default", f"a {f.type} field cannot have a default")
        if f.type in ("formula", "many_to_many") and f.required:
            self.add(where + "/required", f"a {f.type} field cannot be required")
        if f.get("min") is not None and f.get("max") is not None and f.get("min") > f.get("max"):
            self.add(where + "/min", f"min ({f.get('min')}) is greater than max ({f.get('max')})")
        if f.type == "formula" and "scale" in f.doc and f.get("result_type") != "decimal":
            self.add(where + "/scale", "scale applies only to a formula of result_type decimal")
        if "scale" in f.doc or "precision" in f.doc:
            precision, scale = fieldtypes.decimal_shape(f)
            if scale > precision:
                self.add(where + "/scale", f"scale ({scale}) cannot exceed precision ({precision})")
        if f.get("min_length") is not None and f.get("min_length") > fieldtypes.max_length(f):
            self.add(where + "/min_length", "min_length is greater than max_length")
        if f.get("pattern") is not None:
            try:
                re.compile(f.get("pattern"))
            except re.error as exc:
                self.add(where + "/pattern", f"pattern is not a valid regular expression: {exc}")
                return
        options = f.get("options")
        if options is not None:
            values = [o["value"] for o in options]
            for k, value in enumerate(values):
                if values.index(value) != k:
                    self.add(f"{where}/options/{k}/value", f"option '{value}' is listed twice")
        for key in ("target",):
            target = f.get(key)
            if target is not None and target not in self.names["entities"]:
                self.add(
                    f"{where}/{key}",
                    f"'{target}' is not an entity of this bundle",
                    _did_you_mean(target, self.entities),
                )
        for k, target in enumerate(f.get("targets", []) or []):
            if target not in self.entities:
                self.add(
                    f"{where}/targets/{k}",
                    f"'{target}' is not an entity of this bundle",
                    _did_you_mean(target, self.entities),
                )
        if f.type == "lookup" and f.get("on_delete") == "set_null" and f.required:
            self.add(
                where + "/on_delete",
                "a required lookup cannot use on_delete set_null",
                "use restrict or cascade",
            )
        if f.required and f.has_default and f.default is None:
            self.add(where + "/default", "a required field cannot default to null")
        if f.has_default and f.default is not None and ft.coerce is not None:
            try:
                ft.coerce(f, f.default)
            except ValueProblem as exc:
                self.add(where + "/default", f"default {exc}")

    # -- layouts, pipelines, roles, rules ---------------------------------------------------

    def known_field(
        self, where: str, entity: EntityDef, name: Any, system_ok: bool = False
    ) -> bool:
        if name in entity.fields or (system_ok and name in SYSTEM_SORTABLE):
            return True
        self.add(
            where,
            f"'{name}' is not a field of '{entity.name}'",
            _did_you_mean(str(name), entity.fields),
        )
        return False

    def entity_ref(self, where: str, name: Any) -> EntityDef | None:
        entity = self.entities.get(name)
        if entity is None and name not in self.names["entities"]:
            self.add(
                where,
                f"'{name}' is not an entity of this bundle",
                _did_you_mean(str(name), self.entities),
            )
        return entity

    def check_layouts(self) -> None:
        seen: set[str] = set()
        for i, doc in enumerate(self.doc["layouts"]):
            where = self.at("layouts", i)
            entity = self.entity_ref(where + "/entity", doc["entity"])
            if entity is None:
                continue
            if entity.name in seen:
                self.add(where + "/entity", f"entity '{entity.name}' has more than one layout")
            seen.add(entity.name)
            for t, tab in enumerate(doc.get("form", {}).get("tabs", [])):
                for s, section in enumerate(tab.get("sections", [])):
                    for k, name in enumerate(section.get("fields", [])):
                        self.known_field(
                            f"{where}/form/tabs/{t}/sections/{s}/fields/{k}", entity, name
                        )
            listing = doc.get("list", {})
            for k, column in enumerate(listing.get("columns", [])):
                self.known_field(f"{where}/list/columns/{k}/field", entity, column["field"], True)
            for k, sort in enumerate(listing.get("default_sort", [])):
                w = f"{where}/list/default_sort/{k}/field"
                if self.known_field(w, entity, sort["field"], True):
                    f = entity.fields.get(sort["field"])
                    if (
                        f is not None
                        and f.type in fieldtypes.names()
                        and not (fieldtypes.get(f.type).sortable)
                    ):
                        self.add(w, f"a {f.type} field cannot be sorted")
            page = doc.get("record_page", {})
            for k, name in enumerate(page.get("highlights", [])):
                self.known_field(f"{where}/record_page/highlights/{k}", entity, name, True)
            for k, related in enumerate(page.get("related_lists", [])):
                rwhere = f"{where}/record_page/related_lists/{k}"
                other = self.entity_ref(rwhere + "/entity", related["entity"])
                if other is None:
                    continue
                if self.known_field(rwhere + "/field", other, related["field"]):
                    link = other.fields[related["field"]]
                    points_here = link.get("target") == entity.name or entity.name in (
                        link.get("targets") or []
                    )
                    if not points_here:
                        self.add(
                            rwhere + "/field",
                            f"'{other.name}.{link.name}' does not point at '{entity.name}'",
                        )
                for c, name in enumerate(related.get("columns", [])):
                    self.known_field(f"{rwhere}/columns/{c}", other, name, True)

    def check_pipelines(self) -> None:
        names: set[str] = set()
        defaults: set[str] = set()
        for i, doc in enumerate(self.doc["pipelines"]):
            where = self.at("pipelines", i)
            if self.name_ok(where + "/name", doc["name"], "pipeline"):
                if doc["name"] in names:
                    self.add(where + "/name", f"pipeline '{doc['name']}' is defined twice")
                names.add(doc["name"])
            entity = self.entity_ref(where + "/entity", doc["entity"])
            if entity is None:
                continue
            if doc.get("default"):
                if entity.name in defaults:
                    self.add(
                        where + "/default", f"'{entity.name}' has more than one default pipeline"
                    )
                defaults.add(entity.name)
            if not self.known_field(where + "/field", entity, doc["field"]):
                continue
            stage_field = entity.fields[doc["field"]]
            if stage_field.type != "single_select":
                self.add(
                    where + "/field",
                    f"a pipeline needs a single_select field; "
                    f"'{stage_field.name}' is {stage_field.type}",
                )
                continue
            options = {o["value"] for o in stage_field.get("options", [])}
            stage_names: set[str] = set()
            for s, stage in enumerate(doc["stages"]):
                swhere = f"{where}/stages/{s}"
                if stage["name"] not in options:
                    self.add(
                        swhere + "/name",
                        f"stage '{stage['name']}' is not an option of "
                        f"'{entity.name}.{stage_field.name}'",
                        _did_you_mean(stage["name"], options),
                    )
                if stage["name"] in stage_names:
                    self.add(swhere + "/name", f"stage '{stage['name']}' is listed twice")
                stage_names.add(stage["name"])
                if stage.get("won") and stage.get("lost"):
                    self.add(swhere, "a stage cannot be both won and lost")
                for k, name in enumerate(stage.get("required_fields", [])):
                    self.known_field(f"{swhere}/required_fields/{k}", entity, name)

    def check_roles(self) -> None:
        roles: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for i, doc in enumerate(self.doc["roles"]):
            where = self.at("roles", i)
            if not self.name_ok(where + "/name", doc["name"], "role"):
                continue
            if doc["name"] in roles:
                self.add(where + "/name", f"role '{doc['name']}' is defined twice")
                continue
            roles[doc["name"]] = (where, doc)
        for where, doc in roles.values():
            for k, parent in enumerate(doc.get("inherits", [])):
                if parent not in roles:
                    self.add(
                        f"{where}/inherits/{k}",
                        f"'{parent}' is not a role of this bundle",
                        _did_you_mean(parent, roles),
                    )
            for k, grant in enumerate(doc.get("permissions", [])):
                gwhere = f"{where}/permissions/{k}"
                if grant["entity"] == "*":
                    if grant.get("fields"):
                        self.add(gwhere + "/fields", "field access needs a named entity, not '*'")
                    continue
                entity = self.entity_ref(gwhere + "/entity", grant["entity"])
                if entity is not None:
                    for field_name in grant.get("fields", {}):
                        self.known_field(f"{gwhere}/fields/{field_name}", entity, field_name)
        for name in roles:
            path = _cycle_from(name, {n: d.get("inherits", []) for n, (_, d) in roles.items()})
            if path:
                where = roles[name][0]
                self.add(
                    where + "/inherits",
                    "roles inherit from each other in a cycle: " + " → ".join(path),
                )
                break

    def check_rules(self) -> None:
        names: set[str] = set()
        for i, doc in enumerate(self.doc["rules"]):
            where = self.at("rules", i)
            if self.name_ok(where + "/name", doc["name"], "rule"):
                if doc["name"] in names:
                    self.add(where + "/name", f"rule '{doc['name']}' is defined twice")
                names.add(doc["name"])
            entity = self.entity_ref(where + "/entity", doc["entity"])
            if entity is None:
                continue
            trigger = doc["trigger"]
            for k, name in enumerate(trigger.get("fields", [])):
                self.known_field(f"{where}/trigger/fields/{k}", entity, name)
            if "date_field" in trigger and self.known_field(
                where + "/trigger/date_field", entity, trigger["date_field"], True
            ):
                f = entity.fields.get(trigger["date_field"])
                if f is not None and f.type not in ("date", "datetime"):
                    self.add(
                        where + "/trigger/date_field",
                        f"'{f.name}' is {f.type}, not a date or datetime",
                    )

    def check_settings(self) -> None:
        settings = self.doc.get("settings")
        if not isinstance(settings, Mapping) or self.broken_settings:
            return
        timezone = settings.get("timezone")
        if timezone is not None and not isinstance(timezone, str):
            self.add("/settings/timezone", "must be a string such as Asia/Shanghai")
        elif timezone is not None:
            try:
                zoneinfo.ZoneInfo(timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                self.add(
                    "/settings/timezone",
                    f"{timezone!r} is not a known time zone",
                    "use an IANA name such as Asia/Shanghai or Europe/Berlin",
                )
        self.check_security(settings.get("security"))

    def check_security(self, security: Any) -> None:
        """Check what JSON Schema cannot: allowlist entries are networks, roles exist."""
        if not isinstance(security, Mapping):
            return
        for index, entry in enumerate(security.get("ip_allowlist") or ()):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                self.add(
                    f"/settings/security/ip_allowlist/{index}",
                    f"{entry!r} is not a network in CIDR notation",
                    "write an address or a network such as 203.0.113.0/24 or 2001:db8::/32",
                )
        roles = self.doc.get("roles")
        known = (
            {r.get("name") for r in roles if isinstance(r, Mapping)}
            if isinstance(roles, list)
            else set()
        )
        for index, role in enumerate(security.get("mfa_required_roles") or ()):
            if role not in known:
                self.add(
                    f"/settings/security/mfa_required_roles/{index}",
                    f"there is no role '{role}'",
                    _did_you_mean(role, known),
                )
        idle = security.get("session_idle_minutes")
        absolute = security.get("session_absolute_minutes")
        if isinstance(idle, int) and isinstance(absolute, int) and idle > absolute:
            self.add(
                "/settings/security/session_idle_minutes",
                "the idle timeout is longer than the absolute one, so it would never apply",
            )


def _did_you_mean(name: str, choices: Any) -> str | None:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"did you mean '{close[0]}'?" if close else None


def _cycle_from(start: str, edges: Mapping[str, list[str]]) -> list[str] | None:
    """Return a path start → … → start through ``edges`` when there is one."""

    def walk(node: str, path: list[str]) -> Iterator[list[str]]:
        for nxt in edges.get(node, []):
            if nxt == start:
                yield [*path, nxt]
            elif nxt not in path:
                yield from walk(nxt, [*path, nxt])

    return next(walk(start, [start]), None)
