"""The grammar of the expression language and the LALR parser built from it.

LALR parses with an explicit stack, and the tree is built by callbacks as
rules are reduced, so no input can make parsing recurse deeply. Keywords are
case-insensitive; field and function names are plain ASCII identifiers.
"""

from __future__ import annotations

import functools

from lark import Lark

from metacrm.metadata.expression.builder import Builder

GRAMMAR = r"""
?start: _expr

_expr: or_expr

?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*

?not_expr: NOT not_expr                         -> negation
         | predicate

?predicate: sum
          | sum COMPARE sum                     -> compare
          | sum IN choices                      -> in_list
          | sum NOT IN choices                  -> not_in_list
          | sum BETWEEN sum _AND sum            -> between
          | sum NOT BETWEEN sum _AND sum        -> not_between
          | sum CONTAINS sum                    -> match
          | sum STARTS_WITH sum                 -> match
          | sum LIKE sum                        -> match
          | sum IS NULL                         -> is_null
          | sum IS NOT NULL                     -> is_not_null

choices: LPAR _expr (_COMMA _expr)* _RPAR       -> list_value
       | call                                   -> function_choices

?sum: product
    | sum PLUS product                          -> arithmetic
    | sum MINUS product                         -> arithmetic

?product: unary
        | product STAR unary                    -> arithmetic
        | product SLASH unary                   -> arithmetic

?unary: MINUS unary                             -> negate
      | atom

?atom: STRING                                   -> text
     | NUMBER                                   -> number
     | TRUE                                     -> true
     | FALSE                                    -> false
     | NULL                                     -> null
     | NAME (DOT NAME)*                         -> field
     | call
     | LPAR _expr _RPAR                         -> group

call: NAME LPAR _RPAR
    | NAME LPAR _expr (_COMMA _expr)* _RPAR

_OR: "or"i
_AND: "and"i
NOT: "not"i
IN: "in"i
BETWEEN: "between"i
CONTAINS: "contains"i
STARTS_WITH: "starts_with"i
LIKE: "like"i
IS: "is"i
NULL: "null"i
TRUE: "true"i
FALSE: "false"i

COMPARE: /!=|<=|>=|=|<|>/
PLUS: "+"
MINUS: "-"
STAR: "*"
SLASH: "/"
LPAR: "("
_RPAR: ")"
_COMMA: ","
DOT: "."

NAME: /[A-Za-z_][A-Za-z0-9_]*/
NUMBER: /[0-9]+(\.[0-9]+)?/
STRING: /"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'/

%ignore /\s+/
"""

KEYWORDS = frozenset(
    {"and", "or", "not", "in", "between", "contains", "starts_with", "like", "is"}
    | {"null", "true", "false"}
)


@functools.cache
def parser() -> Lark:
    """Build the parser once per process, on first use rather than at import."""
    return Lark(
        GRAMMAR,
        parser="lalr",
        lexer="basic",
        transformer=Builder(),
        maybe_placeholders=False,
    )
