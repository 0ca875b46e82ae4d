"""Record import: a CSV or JSON Lines file becomes records through the record service.

An import is a bulk create with a file's manners, and nothing more privileged:
every row goes through :func:`metacrm.runtime.records.create_many` (the same
validation, field-level security, owner scope, unique and reference checks as
``POST /records/<entity>``), in batches of :data:`BATCH` rows inside one
transaction. Each batch's records are audited by grouped ``record.create``
entries and outbox events of up to 500 records (decision records 0013 and
0015). Either every row is stored or none:

- a refused batch is rolled back to its savepoint and the next batches are
  still checked, so one answer lists the problems of the whole file (up to
  :data:`MAX_ERRORS`; the import stops looking after that many);
- a dry run checks every row the same way, then rolls everything back.

Errors name the row as a person sees it in a spreadsheet: ``row`` is the
file's line where the record starts (the CSV header is line 1, so the first
record is row 2; in JSON Lines the first line is row 1), and ``pointer`` is
``/rows/<row>/<field>``.

CSV columns are matched to fields by API name, then by the English label
(without regard to case) or the Chinese label, among the fields the caller may
see: a hidden field's name or label is "not a field", exactly like a field that
does not exist. Columns of system values (``id``, ``created_at`` …) and of
computed fields (formulas, auto-numbers) are ignored, so an export can be
imported again; ``owner_id`` is kept and assigned within the caller's scope.
Cells are text and become the types the API takes: whole numbers, ``true`` /
``false`` (also ``yes``/``no``, ``1``/``0``, ``是``/``否``), lists as a JSON
array or ``;``-separated items, JSON values as JSON text. An empty cell leaves
the field out (its default applies). A cell that an export defused with a
leading ``'`` (``'=SUM(A1)``) is read back without it.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple, TextIO

from sqlalchemy.engine import Connection

from metacrm.metadata import jsondoc
from metacrm.metadata.fieldtypes import get as field_type
from metacrm.metadata.model import FieldDef
from metacrm.runtime import records, spreadsheet
from metacrm.runtime.crypto import FieldCipher
from metacrm.runtime.model import EntityModel, TenantModel
from metacrm.runtime.recordschema import COMPUTED_TYPES
from metacrm.runtime.recordview import SYSTEM_FIELDS

FORMATS = ("csv", "jsonl")
ENCODINGS = ("utf-8", "gb18030")
#: What the ``delimiter`` parameter may name, and the character it means.
DELIMITERS = {",": ",", ";": ";", "tab": "\t"}
#: Rows per ``create_many`` call: big enough that round trips and the other costs of a
#: call do not dominate (decision record 0015). Its audit entries and outbox events
#: still cover ``records.GROUP`` (500) records each.
BATCH = 2000
#: Problems listed in one answer; the import stops looking after this many.
MAX_ERRORS = 100
MAX_COLUMNS = 500
#: Longest cell (and JSON Lines line) in characters.
MAX_CELL = 1_000_000
#: System columns an import never writes (``owner_id`` is assigned through the service).
IGNORED_SYSTEM = tuple(name for name in SYSTEM_FIELDS if name != "owner_id")
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_TRUE = frozenset({"true", "yes", "y", "1", "是", "真"})
_FALSE = frozenset({"false", "no", "n", "0", "否", "假"})


class UnreadableFile(Exception):
    """The file cannot be read at all (its encoding, its header); ``errors`` says where."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(e["message"] for e in errors))
        self.errors = errors


class ImportRefused(Exception):
    """Rows were refused and nothing was stored; ``errors`` lists them (MAX_ERRORS at most)."""

    def __init__(self, errors: list[dict[str, Any]], rows_read: int, complete: bool) -> None:
        super().__init__(f"{len(errors)} problem(s) in {rows_read} row(s)")
        self.errors = errors
        self.rows_read = rows_read
        #: False when the import stopped looking after MAX_ERRORS problems.
        self.complete = complete


class Row(NamedTuple):
    """One record of the file: where it starts, and its payload for the record service.

    A named tuple: made once per row of a file, which a frozen dataclass made slower.
    """

    number: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class RowProblem:
    """A row that could not be turned into a payload (a cell or a JSON line)."""

    number: int
    errors: list[dict[str, Any]]


@dataclass
class ColumnMap:
    """How a CSV header maps to the entity: a field name per column (None: ignored)."""

    fields: list[str | None]
    #: Header text of each used column -> its field.
    used: dict[str, str] = field(default_factory=dict)
    #: Header text of the columns left out (system values, computed fields).
    ignored: list[str] = field(default_factory=list)


# -- reading the file ---------------------------------------------------------------------


def decode(data: bytes, encoding: str) -> str:
    """Return the file's text, or raise UnreadableFile naming the first undecodable byte."""
    if encoding == "utf-8":
        encoding = "utf-8-sig"  # Excel's "CSV UTF-8" starts with a byte order mark
    try:
        text = codecs.decode(data, encoding)
    except UnicodeDecodeError as exc:
        hint = (
            "; save the file as UTF-8 (Excel: 'CSV UTF-8'), or send encoding=gb18030 "
            "for a file saved by a Chinese version of Excel"
            if encoding.startswith("utf-8")
            else ""
        )
        raise UnreadableFile(
            [
                {
                    "pointer": "/",
                    "message": f"byte {exc.start} is not valid {encoding.removesuffix('-sig')}"
                    + hint,
                }
            ]
        ) from None
    return text


def _label_index(writable: Sequence[FieldDef]) -> dict[str, str]:
    """Map API names and labels (English folded, Chinese as written) to field names."""
    found: dict[str, str] = {}
    for f in writable:
        for key in (f.label.get("zh-CN"), (f.label.get("en") or "").casefold()):
            if key:
                found.setdefault(key.strip(), f.name)
    for f in writable:
        found[f.name] = f.name  # an API name always wins over another field's label
    return found


def map_columns(
    entity: EntityModel, header: Sequence[str], skip: Collection[str] = ()
) -> ColumnMap:
    """Match a CSV header to the entity's fields, or raise UnreadableFile listing every problem.

    ``entity`` is the caller's view of it, so hidden fields are not there to match.
    Columns whose header text is in ``skip`` are left out, as a person leaves a
    spreadsheet column unmapped; naming a column the file does not have is an error.
    """
    if not header or not any(cell.strip() for cell in header):
        raise UnreadableFile(
            [{"pointer": "/rows/1", "message": "the first line must name the columns"}]
        )
    if len(header) > MAX_COLUMNS:
        raise UnreadableFile(
            [{"pointer": "/rows/1", "message": f"has {len(header)} columns; at most {MAX_COLUMNS}"}]
        )
    active = list(entity.entity.active_fields())
    computed = {f.name for f in active if f.type in COMPUTED_TYPES}
    names = _label_index([f for f in active if f.type not in COMPUTED_TYPES])
    known = sorted(names)
    fields: list[str | None] = []
    ignored: list[str] = []
    errors: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    titles = {raw.strip() for raw in header}
    errors.extend(
        {"pointer": "/skip", "message": f"'{name[:80]}' is not a column of the file"}
        for name in skip
        if name not in titles
    )
    for index, raw in enumerate(header, start=1):
        title = raw.strip()
        at = f"/columns/{index}"
        if not title:
            errors.append({"pointer": at, "column": index, "message": "the column has no name"})
            fields.append(None)
            continue
        if title in skip or title in IGNORED_SYSTEM or title in computed:
            ignored.append(title)
            fields.append(None)
            continue
        name = "owner_id" if title == "owner_id" else names.get(title, names.get(title.casefold()))
        if name is None:
            close = difflib.get_close_matches(title, known, 1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(
                {
                    "pointer": at,
                    "column": index,
                    "message": f"'{title[:80]}' is not a field of '{entity.name}'{hint}",
                }
            )
            fields.append(None)
            continue
        if name in seen:
            errors.append(
                {
                    "pointer": at,
                    "column": index,
                    "message": f"'{title[:80]}' is the field '{name}' again "
                    f"(column {seen[name]} already is)",
                }
            )
            fields.append(None)
            continue
        seen[name] = index
        fields.append(name)
    if errors:
        raise UnreadableFile(errors)
    used = {t.strip(): n for t, n in zip(header, fields, strict=True) if n is not None}
    return ColumnMap(fields, used, ignored)


def _json_or_text(text: str) -> Any:
    plain = text.strip()
    try:
        return jsondoc.loads(plain, max_bytes=len(plain.encode()) + 1)
    except jsondoc.DocumentError:
        return text


def _integer(text: str) -> Any:
    plain = text.strip()
    return int(plain) if _INTEGER.fullmatch(plain) else text


def _boolean(text: str) -> Any:
    folded = text.strip().casefold()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    return text


def _items(text: str) -> Any:
    plain = text.strip()
    if plain.startswith("["):
        return _json_or_text(plain)
    return [item.strip() for item in plain.split(";") if item.strip()]


def _related(text: str) -> Any:
    plain = text.strip()
    if ":" in plain and not plain.startswith("{"):
        target, _, record_id = plain.partition(":")
        return {"entity": target.strip(), "id": record_id.strip()}
    return _json_or_text(plain)


#: A cell read without surrounding spaces (a method of str: no Python call per cell).
_stripped: Callable[[str], Any] = str.strip


def _as_is(text: str) -> Any:
    return text


#: How a cell becomes the API's value, by the field type's value type.
_READERS: dict[str, Callable[[str], Any]] = {
    "INTEGER": _integer,
    "BOOLEAN": _boolean,
    "LIST": _items,
    "JSON": _json_or_text,
    "DECIMAL": _stripped,
    "DATE": _stripped,
    "DATETIME": _stripped,
    "UUID": _stripped,
}


def cell_reader(f: FieldDef | None) -> Callable[[str], Any]:
    """Return how one column's cells become the values the API takes (chosen once per column).

    The readers never raise: a cell that does not fit stays text, and the record
    service refuses it with the message the API gives (``must be a whole number``).
    ``None`` is the ``owner_id`` column.
    """
    if f is None or f.type == "single_select":
        return _stripped
    if f.type == "related_to":
        return _related
    return _READERS.get(field_type(f.type).value_type, _as_is)


def _unless_as_is(read: Callable[[str], Any]) -> Callable[[str], Any] | None:
    """Return a column's reader, or None when cells are taken as they are (no call per cell)."""
    return None if read is _as_is else read


def csv_rows(
    entity: EntityModel, source: TextIO, delimiter: str = ",", skip: Collection[str] = ()
) -> tuple[ColumnMap, Iterator[Row | RowProblem]]:
    """Return the header's mapping and the file's records as payloads, read as they are used.

    ``source`` is text opened with ``newline=""`` (a file or ``io.StringIO``).
    Raises UnreadableFile at once for a header that does not fit; problems of single
    rows come out of the iterator as :class:`RowProblem` so that every one is told.
    """
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    try:
        header = next(reader, [])
    except csv.Error as exc:
        raise UnreadableFile([{"pointer": "/rows/1", "message": f"line 1: {exc}"}]) from None
    mapping = map_columns(entity, header, skip)
    columns = [
        (name, _unless_as_is(cell_reader(entity.entity.fields.get(name))))
        for name in mapping.fields
        if name is not None
    ]
    used = [index for index, name in enumerate(mapping.fields) if name is not None]
    # The cells of the used columns (a file's skipped columns left out), picked in C.
    pick: Callable[[list[str]], Sequence[str]] = (
        itemgetter(*used) if len(used) > 1 else lambda cells: [cells[index] for index in used]
    )
    names = [name for name, _ in columns]
    readers = [(name, read) for name, read in columns if read is not None]
    width = len(header)

    def rows() -> Iterator[Row | RowProblem]:
        last = reader.line_num
        try:
            for cells in reader:
                # A record starts on the line after the previous one ended.
                number, last = last + 1, reader.line_num
                if not any(cells):
                    continue  # a blank line
                if len(cells) != width:
                    message = f"has {len(cells)} cells; the header has {width} columns"
                    yield RowProblem(number, [{"pointer": f"/rows/{number}", "message": message}])
                    continue
                picked = pick(cells)
                joined = "\x1f".join(picked)
                if (
                    "\x00" not in joined
                    and "\x1f'" not in joined
                    and joined[:1] != "'"
                    and len(joined) <= MAX_CELL
                ):
                    # The usual row: no cell to refuse or to restore (checked over the row
                    # in C), so only the cells some reader converts cost a call.
                    payload = dict(zip(names, picked, strict=True))
                    if "" in picked:
                        payload = {name: cell for name, cell in payload.items() if cell}
                    for name, read in readers:
                        if name in payload:
                            payload[name] = read(payload[name])
                    yield Row(number, payload)
                    continue
                yield _row_by_cells(number, columns, picked)
        except csv.Error as exc:
            # The reader cannot find the next record after a broken quote.
            number = last + 1
            yield RowProblem(number, [{"pointer": f"/rows/{number}", "message": str(exc)}])

    return mapping, rows()


def _row_by_cells(
    number: int, columns: Sequence[tuple[str, Callable[[str], Any] | None]], picked: Sequence[str]
) -> Row | RowProblem:
    """Read a row cell by cell: one with a NUL, an over-long or a defused (``'``) cell."""
    payload: dict[str, Any] = {}
    problems = []
    for (name, read), cell in zip(columns, picked, strict=True):
        if not cell:
            continue
        if "\x00" in cell or len(cell) > MAX_CELL:
            problems.append(
                {
                    "pointer": f"/rows/{number}/{name}",
                    "message": "must not contain the NUL character"
                    if "\x00" in cell
                    else f"is longer than {MAX_CELL} characters",
                }
            )
            continue
        if cell[0] == "'":
            cell = spreadsheet.restore(cell)
        payload[name] = cell if read is None else read(cell)
    return RowProblem(number, problems) if problems else Row(number, payload)


def lines(text: str) -> Iterator[str]:
    """Yield the lines of a JSON Lines text, split at LF (CRLF too) and nowhere else.

    ``str.splitlines`` also splits at U+2028 and other separators, which a JSON
    string may hold as they are.
    """
    for line in text.split("\n"):
        yield line.removesuffix("\r")


def jsonl_rows(source: Iterable[str]) -> Iterator[Row | RowProblem]:
    """Return the records of a JSON Lines file (one JSON object a line) as payloads."""
    for number, line in enumerate(source, start=1):
        if not line.strip():
            continue
        at = f"/rows/{number}"
        if len(line) > MAX_CELL:
            yield RowProblem(
                number, [{"pointer": at, "message": f"is longer than {MAX_CELL} characters"}]
            )
            continue
        try:
            value = jsondoc.loads(line, max_bytes=len(line.encode()) + 1)
        except jsondoc.DocumentError as exc:
            yield RowProblem(number, [{"pointer": at, "message": f"is not acceptable JSON: {exc}"}])
            continue
        if not isinstance(value, dict):
            yield RowProblem(number, [{"pointer": at, "message": "must be a JSON object"}])
            continue
        for name in IGNORED_SYSTEM:
            value.pop(name, None)  # an exported line carries them; they are the platform's
        yield Row(number, value)


# -- storing ------------------------------------------------------------------------------


def _row_errors(
    numbers: Sequence[int], errors: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Map the service's bulk pointers (``/3/name``) to the file's rows (``/rows/42/name``).

    ``numbers`` are the rows of the batch, in order.
    """
    mapped = []
    for error in errors:
        index, _, rest = str(error.get("pointer", "")).lstrip("/").partition("/")
        if index.isdigit() and int(index) < len(numbers):
            number = numbers[int(index)]
            pointer = f"/rows/{number}/{rest}" if rest else f"/rows/{number}"
            mapped.append({"pointer": pointer, "row": number, "message": error["message"]})
        else:
            mapped.append(dict(error))
    return mapped


#: A batch of an import: its rows' numbers, the problems of rows read with them, and its
#: payloads read ahead.
_Batch = tuple[list[int], list[dict[str, Any]], records.ReadAhead]


def import_rows(
    connection: Connection,
    model: TenantModel,
    entity: EntityModel,
    rows: Iterable[Row | RowProblem],
    caller: records.Caller,
    cipher: FieldCipher,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
) -> tuple[int, int]:
    """Create the rows' records, all or none; return (rows read, records created).

    Runs inside the caller's transaction, in a savepoint of its own: a refusal
    (:class:`ImportRefused`) or a dry run leaves the transaction as it found it.
    """
    # Each batch needs its own savepoint, so that the batches after a refused one
    # are still checked on a usable transaction.
    connection = connection.execution_options(**{records.WHOLE_TRANSACTION: False})
    savepoint = connection.begin_nested()
    errors: list[dict[str, Any]] = []
    read = created = 0
    complete = True
    finished = False
    source = iter(rows)

    def take() -> _Batch | None:
        """Read the next batch's rows, the problems of the rows read with them, and their
        payloads as far as that needs no database (:func:`records.read_ahead`)."""
        nonlocal read, complete, finished
        if finished:
            return None
        # Row numbers and payloads, not the rows: a row then lives only as long as it is
        # read, and the garbage collector does not carry a batch of them from one
        # generation to the next (each full collection walks every object of the process).
        numbers: list[int] = []
        payloads: list[dict[str, Any]] = []
        problems: list[dict[str, Any]] = []
        for row in source:
            if len(errors) + len(problems) >= MAX_ERRORS:
                complete, finished = False, True  # stop looking
                return _read(numbers, payloads, problems)
            read += 1
            if isinstance(row, RowProblem):
                problems.extend({**e, "row": row.number} for e in row.errors)
                continue
            numbers.append(row.number)
            payloads.append(row.payload)
            if len(numbers) >= batch:
                return _read(numbers, payloads, problems)
        finished = True
        return _read(numbers, payloads, problems) if numbers or problems else None

    def _read(
        numbers: list[int], payloads: list[dict[str, Any]], problems: list[dict[str, Any]]
    ) -> _Batch:
        ready = records.read_ahead(connection, model, entity, payloads, caller, cipher)
        return numbers, problems, ready

    def flush(pending: list[int], ready: records.ReadAhead, meanwhile: Callable[[], None]) -> None:
        nonlocal created
        try:
            made = records.create_many(
                connection,
                model,
                entity,
                ready,
                caller,
                cipher,
                bulk=True,
                returning=False,
                grouped=True,
                meanwhile=meanwhile,
            )
            created += len(made)
        except records.RecordInvalid as exc:
            errors.extend(_row_errors(pending, exc.errors))

    try:
        upcoming = take()
        while upcoming is not None:
            pending, problems, ready = upcoming
            errors.extend(problems)
            ahead: list[_Batch | None] = []
            if pending and complete:
                # The next batch is read from the file and checked while the server stores
                # this one.
                flush(pending, ready, lambda found=ahead: found.append(take()))
            upcoming = ahead[0] if ahead else take()
    except BaseException:
        savepoint.rollback()
        raise
    if errors:
        savepoint.rollback()
        raise ImportRefused(errors[:MAX_ERRORS], read, complete)
    if dry_run:
        savepoint.rollback()
    else:
        savepoint.commit()
    return read, 0 if dry_run else created
