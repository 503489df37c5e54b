#!/usr/bin/env python3
"""Proves the ClickHouse landing of docs/kafka.md with ClickHouse itself
(chdb, embedded): checks the DDL in the docs is what tools/clickhouse/ddl.py
makes from the schema, runs it, feeds it MESSAGES (Kafka message payloads,
concatenated: length-delimited xtcp.v1.Records) through the Kafka table and
the materialized view, merges the table (`OPTIMIZE ... FINAL`, as a
ReplacingMergeTree eventually does by itself) and prints what is left in
xtcp.records as JSON.

chdb cannot create Kafka engine tables (it fails with "Shutdown was
called"), so the Kafka table is made with the Null engine instead, same
columns: an INSERT into it runs the materialized view as a Kafka read would.

With --connections, it runs instead the query of docs/lifecycle.md ("One row
per connection") over what landed and prints its rows as JSON lines.

Usage: python3 tools/clickhouse/check.py [--connections] MESSAGES
(crates/forwarder/tests/kafka.rs and tests/it/clickhouse.rs run it)
"""
import json
import os
import re
import sys

from chdb import session

from ddl import PROTO, ddl

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs")


def connection_query():
    """The SQL block under "One row per connection" in docs/lifecycle.md."""
    with open(os.path.join(DOCS, "lifecycle.md")) as f:
        text = f.read()
    section = text.split("### One row per connection", 1)[1]
    return re.search(r"```sql\n(.*?)```", section, re.S).group(1)


def land(db, messages):
    """Runs the DDL of docs/kafka.md and feeds MESSAGES through it."""
    statements = ddl()
    with open(os.path.join(DOCS, "kafka.md")) as f:
        if statements not in f.read():
            sys.exit("docs/kafka.md does not carry the DDL of tools/clickhouse/ddl.py: "
                     "paste its output again")
    local = re.sub(r"ENGINE = Kafka\nSETTINGS\n.*?;", "ENGINE = Null;", statements, flags=re.S)
    assert local != statements
    for statement in local.split(";"):
        code = [l for l in statement.splitlines() if l.strip() and not l.startswith("--")]
        if code:
            db.query(statement)
    schema = os.path.abspath(PROTO)
    db.query(f"INSERT INTO xtcp.records_kafka SELECT * FROM file('{os.path.abspath(messages)}', "
             f"'Protobuf') SETTINGS format_schema = '{schema}:Record'")
    db.query("OPTIMIZE TABLE xtcp.records FINAL")


def main(messages, connections=False):
    db = session.Session()
    try:
        land(db, messages)
        if connections:
            print(str(db.query(connection_query(), "JSONEachRow")).strip())
            return
        result = db.query("""
            SELECT
                count() AS rows,
                uniqExact(hostname, instance, record_counter) AS unique_records,
                uniqExact(instance) AS instances,
                min(record_counter) AS min_counter,
                max(record_counter) AS max_counter,
                countIf(inet_diag_msg_family = 2) AS v4,
                countIf(inet_diag_msg_family = 10) AS v6,
                groupUniqArray(source_ip) AS source_ips,
                groupUniqArray(hostname) AS hostnames,
                countIf(tcp_info_rtt IS NULL) AS without_rtt,
                countIf(socket_mark IS NULL) AS without_mark,
                groupUniqArray(congestion_algorithm_enum) AS algorithms,
                uniqExact(inet_diag_msg_socket_source_port, inet_diag_msg_socket_destination_port,
                          inet_diag_msg_family) AS sockets
            FROM xtcp.records
            """, "JSONEachRow")
        print(str(result).strip())
    finally:
        db.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    connections = args[:1] == ["--connections"]
    if len(args) != 1 + connections:
        sys.exit(__doc__)
    main(args[-1], connections)
