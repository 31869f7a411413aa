"""``tao sql`` is read-only unless asked: which statements only read the tao tables.

The check is lexical, on the statement with its comments and string literals removed: one statement; it starts
with a reading keyword (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, VALUES, TABLE, FROM); no keyword that writes or
changes the session appears as a bare word; no file is read by path (``parquet.`/x```, ``read_files(...)``).
Identifiers in backticks are names, never keywords, so a column called ``update`` is fine as `` `update` ``.
"""

from __future__ import annotations

import re

READS = {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "VALUES", "TABLE", "FROM"}
WRITES = {"INSERT", "UPDATE", "DELETE", "MERGE", "DROP", "CREATE", "ALTER", "TRUNCATE", "OVERWRITE", "DIRECTORY",
          "ADD", "LOAD", "CACHE", "UNCACHE", "REFRESH", "MSCK", "OPTIMIZE", "VACUUM", "RESTORE", "GRANT", "REVOKE",
          "CALL", "COPY", "CLONE", "SET", "RESET", "USE", "ANALYZE", "REPAIR", "RENAME"}
# Spark's data-source-by-path syntax and the table functions that read files.
FILE_READ = re.compile(r"\b(?:parquet|json|csv|text|orc|avro|delta|binaryfile|jdbc|xml)\s*\.\s*`"
                       r"|\bread_(?:files|csv|json|parquet|text|kafka|pubsub|kinesis|statestore)\s*\(",
                       re.IGNORECASE)
_LEXEME = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"|`(?:``|[^`])*`|;|[A-Za-z_]\w*|.",
                     re.DOTALL)


def read_only_reason(query: str) -> str | None:
    """None when ``query`` only reads the tao tables; else the one-line reason it is refused."""
    statements: list[list[str]] = [[]]
    shape: list[str] = []  # the query with comments and strings blanked, backticked names kept (the path check)
    for lex in _LEXEME.findall(query):
        if lex.startswith(("--", "/*")) or lex.isspace():
            shape.append(" ")
        elif lex[0] in "'\"":
            shape.append("''")
        elif lex == ";":
            statements.append([])
            shape.append(";")
        else:
            shape.append(lex)
            if lex[0] != "`" and (lex[0].isalpha() or lex[0] == "_"):
                statements[-1].append(lex.upper())
    statements = [s for s in statements if s]
    if not statements:
        return "an empty statement"
    if len(statements) > 1:
        return "one statement at a time"
    words = statements[0]
    if words[0] not in READS:
        return f"{words[0]} is not a read (tao sql runs SELECT, WITH, SHOW, DESCRIBE and EXPLAIN)"
    writes = sorted(set(words) & WRITES)
    if writes:
        return f"the statement writes or changes the session ({', '.join(writes)})"
    if FILE_READ.search("".join(shape)):
        return "the statement reads files by path, not the tao tables"
    return None
