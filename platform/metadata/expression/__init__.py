"""The expression language shared by filters, formulas, validation rules and rule conditions.

Text is parsed once (``parse``), checked against an entity's fields
(``check``), and compiled either to SQL (``compile_sql``) or to a Python
function (``compile_python``); both give the same answer on every record,
nulls included. ``docs/expressions.md`` is the reference for admins.
"""

from metacrm.metadata.expression.checker import check
from metacrm.metadata.expression.context import EvalContext
from metacrm.metadata.expression.errors import ExpressionError
from metacrm.metadata.expression.nodes import Node
from metacrm.metadata.expression.parser import parse
from metacrm.metadata.expression.printer import unparse
from metacrm.metadata.expression.py_compiler import compile_python
from metacrm.metadata.expression.resolver import table_resolver
from metacrm.metadata.expression.scope import FieldInfo, Scope, ValueType
from metacrm.metadata.expression.sql_compiler import ColumnResolver, compile_sql
from metacrm.metadata.expression.sqlite import register_sqlite_functions
from metacrm.metadata.expression.value import ValueResolver, default_value_resolver
from metacrm.metadata.expression.walk import references

__all__ = [
    "ColumnResolver",
    "EvalContext",
    "ExpressionError",
    "FieldInfo",
    "Node",
    "Scope",
    "ValueResolver",
    "ValueType",
    "check",
    "compile_python",
    "compile_sql",
    "default_value_resolver",
    "parse",
    "references",
    "register_sqlite_functions",
    "table_resolver",
    "unparse",
]
