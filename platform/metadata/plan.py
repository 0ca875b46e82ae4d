"""Diff a published bundle against a new one into an ordered migration plan.

The plan is what an admin reviews before publishing: each operation carries a
sentence a person understands and says whether it is *risky* (it depends on the
data, which the runtime checks before applying) or *destructive* (it drops
data and needs explicit confirmation). Planning is pure; the runtime checks
the data and applies the plan in one transaction.

API names are stable: a field or entity that disappears from the new bundle is
archived (hidden, data kept) and carried forward in the stored bundle, so it
can be restored by adding it back, or purged explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from metacrm.metadata import fieldtypes
from metacrm.metadata.conversions import conversion
from metacrm.metadata.model import Bundle, EntityDef, FieldDef
from metacrm.metadata.validation import BundleInvalid, Problem, pointer, require_valid

#: Keys that describe a column's shape; metadata only where the column has no such shape.
SHAPE_KEYS = {"max_length", "precision", "scale"}
#: Field keys whose change alters storage; every other key is metadata only.
STORAGE_KEYS = {
    "type",
    "required",
    "unique",
    "indexed",
    "max_length",
    "precision",
    "scale",
    "target",
    "on_delete",
    "targets",
    "archived",
}


@dataclass(frozen=True)
class Operation:
    """One step of a migration plan."""

    kind: str
    description: str
    entity: str | None = None
    field: str | None = None
    risky: bool = False
    destructive: bool = False
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the operation as the API and CLI show it."""
        result = asdict(self)
        result["params"] = dict(self.params)
        return result


@dataclass(frozen=True)
class Plan:
    """The ordered operations turning one bundle into another, and the bundle to store."""

    operations: list[Operation]
    result: dict[str, Any]

    @property
    def destructive(self) -> bool:
        return any(op.destructive for op in self.operations)

    @property
    def empty(self) -> bool:
        return not self.operations

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as the API and CLI show it."""
        return {
            "operations": [op.to_dict() for op in self.operations],
            "destructive": self.destructive,
            "risky": any(op.risky for op in self.operations),
        }


def _label(doc: Mapping[str, Any]) -> str:
    label = doc.get("label", {})
    return label.get("en", doc.get("name", "")) if isinstance(label, Mapping) else str(label)


class _Planner:
    def __init__(self, old: Bundle, new_doc: dict[str, Any], purge: set[str]) -> None:
        self.old = old
        self.new = new_doc
        self.purge = purge
        self.ops: dict[str, list[Operation]] = {k: [] for k in _ORDER}
        self.problems: list[Problem] = []
        #: Whether archived items were carried forward into the stored bundle.
        self.carried = False
        #: Describe changes between stored versions instead of planning a publish.
        self.describe_only = False

    def add(self, op: Operation) -> None:
        self.ops[op.kind].append(op)

    def refuse(self, where: str, message: str, hint: str | None = None) -> None:
        if self.describe_only:
            # A diff between stored versions describes what happened; it refuses nothing.
            self.ops["update_document"].append(Operation("unplannable", message))
            return
        self.problems.append(Problem(where, message, hint))

    def _drop_purged(self) -> None:
        """Treat archived items named in ``purge`` as absent, however the client sent them.

        A client that fetched the bundle, kept an archived field in it and asked to
        purge that field means the same as one that left it out.
        """
        kept = []
        for edoc in self.new["entities"]:
            if edoc["name"] in self.purge and edoc.get("archived"):
                continue
            edoc["fields"] = [
                f
                for f in edoc["fields"]
                if not (f.get("archived") and f"{edoc['name']}.{f['name']}" in self.purge)
            ]
            kept.append(edoc)
        self.new["entities"] = kept

    def run(self) -> Plan:
        self._drop_purged()
        new_entities = {e["name"]: e for e in self.new["entities"]}
        for index, edoc in enumerate(self.new["entities"]):
            old = self.old.entities.get(edoc["name"])
            where = pointer("entities", index)
            if old is None:
                self.create_entity(edoc)
            else:
                self.compare_entity(old, edoc, where)
        for name, old in self.old.entities.items():
            if name in new_entities:
                continue
            if name in self.purge:
                if not old.archived and not self.describe_only:
                    self.refuse(
                        pointer("entities"),
                        f"entity '{name}' must be archived before it is purged",
                        "publish without it first, then purge",
                    )
                    continue
                self.add(
                    Operation(
                        "purge_entity",
                        f"Purge entity '{name}': drop its table and every record in it",
                        name,
                        destructive=True,
                    )
                )
                continue
            archived = copy.deepcopy(dict(old.doc))
            inner = [p for p in self.purge if p.startswith(f"{name}.")]
            if inner:
                self.refuse(
                    pointer("purge"),
                    f"'{inner[0]}' belongs to an archived entity",
                    f"restore '{name}' first, or purge the whole entity",
                )
            if not old.archived:
                archived["archived"] = True
                self.add(
                    Operation(
                        "archive_entity",
                        f"Archive entity '{_label(old.doc)}' ({name}): hide it, keep its records",
                        name,
                    )
                )
            self.new["entities"].append(archived)
            self.carried = True
        live = {e["name"]: e for e in self.new["entities"] if not e.get("archived")}
        for entry in self.purge:
            entity, _, field_name = entry.partition(".")
            if entity in live and (
                not field_name
                or any(
                    f["name"] == field_name and not f.get("archived")
                    for f in live[entity]["fields"]
                )
            ):
                self.refuse(
                    pointer("purge"),
                    f"'{entry}' must be archived before it is purged",
                    "publish without it first, then purge",
                )
                continue
            if field_name and entity not in self.old.entities:
                self.refuse(pointer("purge"), f"cannot purge '{entry}': no such entity")
            elif field_name and field_name not in self.old.entities[entity].fields:
                self.refuse(pointer("purge"), f"cannot purge '{entry}': no such field")
            elif not field_name and entity not in self.old.entities:
                self.refuse(pointer("purge"), f"cannot purge '{entry}': no such entity")
        self.compare_documents()
        if self.problems:
            raise BundleInvalid(self.problems)
        operations = [op for kind in _ORDER for op in self.ops[kind]]
        return Plan(operations, self.new)

    # -- entities ---------------------------------------------------------------------------

    def create_entity(self, edoc: Mapping[str, Any]) -> None:
        count = len(edoc["fields"])
        self.add(
            Operation(
                "create_entity",
                f"Create entity '{_label(edoc)}' ({edoc['name']}) "
                f"with {count} field{'s' if count != 1 else ''}",
                edoc["name"],
            )
        )

    def compare_entity(self, old: EntityDef, edoc: dict[str, Any], where: str) -> None:
        name = edoc["name"]
        if not old.archived and edoc.get("archived"):
            self.add(
                Operation(
                    "archive_entity",
                    f"Archive entity '{_label(edoc)}' ({name}): hide it, keep its records",
                    name,
                )
            )
        if old.archived and not edoc.get("archived"):
            self.add(
                Operation(
                    "restore_entity",
                    f"Restore archived entity '{_label(edoc)}' ({name}) with its records",
                    name,
                )
            )
        changed = sorted(
            k
            for k in set(old.doc) | set(edoc)
            if k not in ("fields", "indexes", "archived") and old.doc.get(k) != edoc.get(k)
        )
        if changed:
            self.add(
                Operation(
                    "update_entity",
                    f"Update {', '.join(changed)} of entity '{_label(edoc)}'",
                    name,
                    params={"keys": changed},
                )
            )
        new_fields = {f["name"]: f for f in edoc["fields"]}
        for j, fdoc in enumerate(edoc["fields"]):
            fwhere = f"{where}/fields/{j}"
            previous = old.fields.get(fdoc["name"])
            if previous is None:
                self.add_field(FieldDef(name, fdoc))
            else:
                self.compare_field(previous, FieldDef(name, fdoc), fwhere)
        for fname, previous in old.fields.items():
            if fname in new_fields:
                continue
            path = f"{name}.{fname}"
            if path in self.purge:
                if not previous.archived and not self.describe_only:
                    self.refuse(
                        where + "/fields",
                        f"field '{path}' must be archived before it is purged",
                        "publish without it first, then purge",
                    )
                    continue
                self.add(
                    Operation(
                        "purge_field",
                        f"Purge field '{path}': drop its column and the data in it",
                        name,
                        fname,
                        destructive=True,
                        params={"doc": dict(previous.doc)},
                    )
                )
                continue
            archived = copy.deepcopy(dict(previous.doc))
            if not previous.archived:
                archived["archived"] = True
                self.add(
                    Operation(
                        "archive_field",
                        f"Archive field '{_label(previous.doc)}' ({path}): hide it, keep its data",
                        name,
                        fname,
                    )
                )
            edoc["fields"].append(archived)
            self.carried = True

        def live(names: Any) -> list[str]:
            """Names in both versions and archived in neither, in the given order."""
            return [
                n
                for n in names
                if n in old.fields
                and n in new_fields
                and not old.fields[n].archived
                and not new_fields[n].get("archived")
            ]

        old_order = live(old.fields)
        new_order = live(new_fields)
        if old_order != new_order:
            self.add(Operation("reorder_fields", f"Reorder the fields of '{_label(edoc)}'", name))
        old_indexes = {i["name"]: i for i in old.indexes}
        new_indexes = {i["name"]: i for i in edoc.get("indexes", [])}
        for iname, spec in old_indexes.items():
            if new_indexes.get(iname) != spec:
                self.add(
                    Operation(
                        "drop_index",
                        f"Drop index '{iname}' on '{name}'",
                        name,
                        params={"index": dict(spec)},
                    )
                )
        for iname, spec in new_indexes.items():
            if old_indexes.get(iname) != spec:
                kind = "unique index" if spec.get("unique") else "index"
                self.add(
                    Operation(
                        "add_index",
                        f"Add {kind} '{iname}' on '{name}' ({', '.join(spec['fields'])})",
                        name,
                        risky=bool(spec.get("unique")),
                        params={"index": dict(spec)},
                    )
                )

    # -- fields -----------------------------------------------------------------------------

    def add_field(self, f: FieldDef) -> None:
        ft = fieldtypes.get(f.type)
        if f.type == "many_to_many":
            self.add(
                Operation(
                    "add_relation",
                    f"Add relation '{_label(f.doc)}' ({f.path}) to "
                    f"'{f.get('target')}', stored in a link table",
                    f.entity,
                    f.name,
                    params={"doc": dict(f.doc)},
                )
            )
            return
        if not ft.stored:
            self.add(
                Operation(
                    "add_virtual_field",
                    f"Add {f.type} field '{_label(f.doc)}' ({f.path}), computed when read",
                    f.entity,
                    f.name,
                    params={"doc": dict(f.doc)},
                )
            )
            return
        note = ""
        risky = False
        if f.required:
            if f.has_default and f.default is not None:
                note = f", existing records get the default {f.default!r}"
            else:
                note = ", which needs the table to be empty"
                risky = True
        self.add(
            Operation(
                "add_field",
                f"Add {f.type} field '{_label(f.doc)}' ({f.path}){note}",
                f.entity,
                f.name,
                risky=risky,
                params={"doc": dict(f.doc)},
            )
        )
        if f.unique or f.indexed or f.type in ("auto_number", "lookup"):
            self.add(
                Operation(
                    "add_field_index",
                    f"Index field '{f.path}'" + (" (unique)" if f.unique else ""),
                    f.entity,
                    f.name,
                    params={"doc": dict(f.doc)},
                )
            )

    def compare_field(self, old: FieldDef, new: FieldDef, where: str) -> None:
        path = new.path
        if not old.archived and new.archived:
            self.add(
                Operation(
                    "archive_field",
                    f"Archive field '{_label(new.doc)}' ({path}): hide it, keep its data",
                    new.entity,
                    new.name,
                )
            )
        if old.archived and not new.archived and new.required and fieldtypes.get(new.type).stored:
            # Its column took nulls while archived; restoring it checks that again.
            self.add(
                Operation(
                    "set_required",
                    f"Make '{path}' required again; records created "
                    "while it was archived must have a value",
                    new.entity,
                    new.name,
                    risky=True,
                    params={"doc": dict(new.doc)},
                )
            )
        if old.archived and not new.archived:
            self.add(
                Operation(
                    "restore_field",
                    f"Restore archived field '{_label(new.doc)}' ({path}) with its data",
                    new.entity,
                    new.name,
                )
            )
        if old.type != new.type or _storage_shape(old) != _storage_shape(new):
            self.change_storage(old, new, where)
        elif old.get("on_delete", "set_null") != new.get("on_delete", "set_null"):
            self.add(
                Operation(
                    "change_on_delete",
                    f"When a '{new.get('target')}' record is "
                    f"deleted, {new.get('on_delete', 'set_null').replace('_', ' ')} "
                    f"'{path}' (was {old.get('on_delete', 'set_null')})",
                    new.entity,
                    new.name,
                    params={"old": dict(old.doc), "doc": dict(new.doc)},
                )
            )
        if old.required != new.required:
            if new.required:
                fill = (
                    f"; empty values become {new.default!r}"
                    if new.has_default and new.default is not None
                    else ""
                )
                self.add(
                    Operation(
                        "set_required",
                        f"Make '{path}' required{fill}",
                        new.entity,
                        new.name,
                        risky=True,
                        params={"doc": dict(new.doc)},
                    )
                )
            else:
                self.add(
                    Operation(
                        "drop_required",
                        f"Make '{path}' optional",
                        new.entity,
                        new.name,
                        params={"doc": dict(new.doc)},
                    )
                )
        if (
            old.type == new.type
            and fieldtypes.get(new.type).stored
            and _default_sql(old) != _default_sql(new)
        ):
            self.add(
                Operation(
                    "change_default",
                    f"Change the column default of '{path}' to {new.default!r}"
                    if _default_sql(new)
                    else f"Remove the column default of '{path}'",
                    new.entity,
                    new.name,
                    params={"doc": dict(new.doc)},
                )
            )
        old_index = _index_kind(old)
        new_index = _index_kind(new)
        if old_index != new_index:
            if old_index:
                self.add(
                    Operation(
                        "drop_field_index",
                        f"Drop the {old_index} index on '{path}'",
                        new.entity,
                        new.name,
                        params={"doc": dict(old.doc)},
                    )
                )
            if new_index:
                self.add(
                    Operation(
                        "add_field_index",
                        f"Add a {new_index} index on '{path}'",
                        new.entity,
                        new.name,
                        risky=new_index == "unique",
                        params={"doc": dict(new.doc)},
                    )
                )
        same_shape = old.type == new.type and _storage_shape(old) == _storage_shape(new)
        metadata_keys = sorted(
            k
            for k in set(old.doc) | set(new.doc)
            if old.doc.get(k) != new.doc.get(k)
            and (k not in STORAGE_KEYS or (same_shape and k in SHAPE_KEYS))
        )
        if metadata_keys:
            verb = "Relabel" if metadata_keys == ["label"] else "Update"
            what = "" if verb == "Relabel" else f" {', '.join(metadata_keys)} of"
            self.add(
                Operation(
                    "update_field",
                    f"{verb}{what} field '{path}'"
                    + (f" to '{_label(new.doc)}'" if "label" in metadata_keys else ""),
                    new.entity,
                    new.name,
                    params={"keys": metadata_keys},
                )
            )

    def change_storage(self, old: FieldDef, new: FieldDef, where: str) -> None:
        path = new.path
        if old.type in ("lookup", "many_to_many") and old.type == new.type:
            self.refuse(
                where + "/target",
                f"the target of '{path}' cannot change "
                f"('{old.get('target')}' → '{new.get('target')}')",
                "add a new field and archive this one",
            )
            return
        if old.type == "related_to" and new.type == "related_to":
            self.add(
                Operation(
                    "update_field",
                    f"Change the targets of '{path}'",
                    new.entity,
                    new.name,
                    params={"keys": ["targets"]},
                )
            )
            return
        old_ft, new_ft = fieldtypes.get(old.type), fieldtypes.get(new.type)
        if not old_ft.stored and not new_ft.stored and old.type == new.type:
            return
        convert = conversion(old, new) if old_ft.stored and new_ft.stored else None
        if convert is None:
            self.refuse(
                where + "/type",
                f"'{path}' cannot change from {old.type} to {new.type}",
                "add a new field, copy the data, and archive this one",
            )
            return
        if old.type != new.type:
            sentence = f"Convert '{path}' from {old.type} to {new.type}"
        else:
            shapes = {"max_length": (fieldtypes.max_length(old), fieldtypes.max_length(new))}
            if old.type in ("decimal", "currency", "percent"):
                (p1, s1), (p2, s2) = fieldtypes.decimal_shape(old), fieldtypes.decimal_shape(new)
                shapes = {"precision": (p1, p2), "scale": (s1, s2)}
            sentence = (
                f"Change the storage of '{path}' ("
                + ", ".join(f"{k} {a} → {b}" for k, (a, b) in shapes.items() if a != b)
                + ")"
            )
        if not convert.always:
            sentence += "; refused if a stored value does not fit"
        self.add(
            Operation(
                "change_type",
                sentence,
                new.entity,
                new.name,
                risky=not convert.always,
                params={"old": dict(old.doc), "doc": dict(new.doc)},
            )
        )

    # -- other documents ------------------------------------------------------------------

    def compare_documents(self) -> None:
        for kind, key, noun in (
            ("layouts", "entity", "layout"),
            ("pipelines", "name", "pipeline"),
            ("roles", "name", "role"),
            ("rules", "name", "automation rule"),
        ):
            old = {d[key]: d for d in self.old.documents(kind)}
            new = {d[key]: d for d in self.new.get(kind, [])}
            for name, doc in new.items():
                if name not in old:
                    self.add(
                        Operation(
                            "add_document",
                            f"Add {noun} '{name}'",
                            params={"kind": kind, "name": name},
                        )
                    )
                elif old[name] != doc:
                    self.add(
                        Operation(
                            "update_document",
                            f"Update {noun} '{name}'",
                            params={"kind": kind, "name": name},
                        )
                    )
            for name in old:
                if name not in new:
                    self.add(
                        Operation(
                            "remove_document",
                            f"Remove {noun} '{name}'",
                            params={"kind": kind, "name": name},
                        )
                    )
        for kind in ("branding", "settings"):
            if self.old.doc.get(kind) != self.new.get(kind):
                self.add(
                    Operation(
                        "update_document", f"Update the tenant's {kind}", params={"kind": kind}
                    )
                )


def _storage_shape(f: FieldDef) -> tuple[Any, ...]:
    if f.type in ("text", "email", "phone", "url"):
        # VARCHAR(n): the length is part of the column. long_text, rich_text and
        # encrypted_text are TEXT columns, where max_length is only a validation rule.
        return (fieldtypes.max_length(f),)
    if f.type in ("decimal", "currency", "percent"):
        return fieldtypes.decimal_shape(f)
    if f.type in ("lookup", "many_to_many"):
        return (f.get("target"),)
    if f.type == "related_to":
        return tuple(f.get("targets", []))
    return ()


def _default_sql(f: FieldDef) -> str | None:
    """Return the server default a field's column has, as SQL text (None for none)."""
    default = fieldtypes.server_default(f)
    return None if default is None else default.text


def _index_kind(f: FieldDef) -> str | None:
    ft = fieldtypes.get(f.type)
    if not (ft.stored and ft.indexable):
        return None
    if f.unique or f.type == "auto_number":
        return "unique"
    if f.indexed or f.type == "lookup":
        return "plain"
    return None


_ORDER = (
    "create_entity",
    "restore_entity",
    "update_entity",
    "restore_field",
    "add_field",
    "add_relation",
    "add_virtual_field",
    "change_type",
    "change_on_delete",
    "drop_required",
    "set_required",
    "change_default",
    "drop_index",
    "drop_field_index",
    "add_field_index",
    "add_index",
    "update_field",
    "reorder_fields",
    "archive_field",
    "archive_entity",
    "purge_field",
    "purge_entity",
    "add_document",
    "update_document",
    "remove_document",
)


def describe_change(old: Bundle, new: Bundle, forward: bool = True) -> Plan:
    """Describe how one stored version leads to another (for diff; refuses nothing).

    Stored bundles carry archived items forward, so going forward in history
    anything of ``old`` missing from ``new`` was purged. Going backward, the
    question is what returning to ``new`` would do: archive what came later.
    """
    purged: list[str] = []
    if forward:
        purged = [n for n in old.entities if n not in new.entities]
        for name, entity in old.entities.items():
            if name in new.entities:
                purged.extend(
                    f"{name}.{f}" for f in entity.fields if f not in new.entities[name].fields
                )
    planner = _Planner(old, copy.deepcopy(dict(new.doc)), set(purged))
    planner.describe_only = True
    return planner.run()


def make_plan(
    old: Bundle, new_doc: Any, purge: Iterable[str] = (), *, validated: bool = False
) -> Plan:
    """Validate ``new_doc`` and plan the change from ``old``; raise BundleInvalid when refused.

    ``validated`` skips the first validation for a document the caller has just
    validated itself (a shipped template, checked once when it is loaded).
    """
    if not validated:
        require_valid(new_doc)
    planner = _Planner(old, copy.deepcopy(dict(new_doc)), set(purge))
    plan = planner.run()
    if planner.carried:
        # The stored bundle (with archived items carried forward) must itself be valid.
        require_valid(plan.result)
    return plan
