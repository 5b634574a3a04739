#!/usr/bin/env python3
"""Runs Lumen's modern ClickHouse DDL and shipped queries on chDB (ClickHouse 26.x in-process).

Input: a JSON spec (path in argv[1]) written by the Rust test or benchmark:
  ddl          statements of the modern schema, run twice (migrations must be idempotent)
  insert       INSERT ... SELECT FROM file(...) statements (each run `insert_repeat` times)
  queries      [{"name", "sql"}]: every shipped query, rendered with its bound values
  statements   extra statements run after the inserts (e.g. TTL changes), in order
  optimize     tables to OPTIMIZE ... FINAL before measuring
  measure      tables whose rows and bytes on disk to report
Output (stdout): JSON with the results; a failing statement exits non-zero with the statement.
"""
import json
import sys
import tempfile

import chdb
from chdb import session


def rows(s, sql):
    res = s.query(sql, "JSONCompact")
    text = res.bytes().decode() if hasattr(res, "bytes") else str(res)
    if not text.strip():
        return []
    return json.loads(text)["data"]


def run(s, sql):
    try:
        s.query(sql)
    except Exception as e:  # noqa: BLE001 - report which statement failed
        print(json.dumps({"error": str(e), "statement": sql}))
        sys.exit(1)


def main():
    spec = json.load(open(sys.argv[1]))
    out = {"version": None, "queries": {}, "measure": {}}
    with tempfile.TemporaryDirectory() as d:
        s = session.Session(d)
        out["version"] = rows(s, "SELECT version()")[0][0]
        for _ in range(2):
            for sql in spec["ddl"]:
                run(s, sql)
        for sql in spec.get("insert", []):
            for _ in range(spec.get("insert_repeat", 1)):
                run(s, sql)
        for sql in spec.get("statements", []):
            run(s, sql)
        for q in spec.get("queries", []):
            try:
                out["queries"][q["name"]] = rows(s, q["sql"])
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"error": str(e), "statement": q["sql"], "name": q["name"]}))
                sys.exit(1)
        for t in spec.get("optimize", []):
            run(s, f"OPTIMIZE TABLE {t} FINAL")
        for t in spec.get("measure", []):
            db, name = t.split(".")
            r = rows(
                s,
                "SELECT sum(rows), sum(bytes_on_disk), sum(data_compressed_bytes), "
                "sum(data_uncompressed_bytes), count() FROM system.parts "
                f"WHERE database = '{db}' AND table = '{name}' AND active",
            )[0]
            cols = rows(
                s,
                "SELECT name, sum(data_compressed_bytes) AS c FROM system.columns "
                f"WHERE database = '{db}' AND table = '{name}' GROUP BY name ORDER BY c DESC",
            )
            out["measure"][t] = {
                "rows": int(r[0]),
                "bytes_on_disk": int(r[1]),
                "compressed": int(r[2]),
                "uncompressed": int(r[3]),
                "parts": int(r[4]),
                "columns": [[c[0], int(c[1])] for c in cols],
            }
        s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
