#!/usr/bin/env python3
"""Prints the ClickHouse DDL that lands the Kafka topic in a table, made from
proto/xtcp.proto so the columns follow the schema: a Kafka engine table
reading length-delimited `xtcp.v1.Record`s (format `Protobuf`), a
ReplacingMergeTree table that keeps them, and the materialized view between.
docs/kafka.md carries the output; tools/clickhouse/check.py checks the two
match and runs the DDL in ClickHouse (chdb).

Usage: python3 tools/clickhouse/ddl.py [BROKERS] [TOPIC]
"""
import os
import re
import sys

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "xtcp.proto")

SCALARS = {
    "uint32": "UInt32",
    "uint64": "UInt64",
    "int32": "Int32",
    "int64": "Int64",
    "bool": "Bool",
    "string": "String",
    "bytes": "String",
}

# Strings of few distinct values per host (the owner of a connection):
# dictionary-encoded.
LOW_CARDINALITY = {"netns_name", "cgroup_path", "systemd_unit", "container_id", "pod_uid"}

# Addresses arrive as 4 or 16 network-order bytes; these render them.
IP_ALIASES = [
    ("source_ip", "inet_diag_msg_socket_source"),
    ("destination_ip", "inet_diag_msg_socket_destination"),
]


def record_fields(proto_text):
    """[(name, ClickHouse type)] of message Record, in field order."""
    body = re.search(r"^message Record \{(.*?)^\}", proto_text, re.S | re.M).group(1)
    enums = set(re.findall(r"^enum (\w+) \{", proto_text, re.M))
    fields = []
    for optional, kind, name, number in re.findall(
            r"^\s*(optional )?([\w.]+) (\w+) = (\d+);", body, re.M):
        if kind in enums or name in LOW_CARDINALITY:
            # An enum arrives as its value names; both repeat a few values.
            column = "LowCardinality(String)"
        else:
            column = SCALARS[kind]
        if optional:
            # Absent (the kernel did not send it) is NULL, not zero.
            column = f"Nullable({column})"
        fields.append((int(number), name, column))
    return [(name, column) for _, name, column in sorted(fields)]


def ddl(brokers="kafka:9092", topic="xtcp"):
    with open(PROTO) as f:
        fields = record_fields(f.read())
    width = max(len(name) for name, _ in fields)
    columns = ",\n".join(f"    {name:<{width}} {column}" for name, column in fields)
    aliases = ",\n".join(
        f"    {alias} String ALIAS if(inet_diag_msg_family = 2,\n"
        f"        IPv4NumToString(reinterpretAsUInt32(reverse({column}))),\n"
        f"        IPv6NumToString(toFixedString({column}, 16)))"
        for alias, column in IP_ALIASES)
    return f"""CREATE DATABASE IF NOT EXISTS xtcp;

-- Reads the topic: each message is length-delimited xtcp.v1.Records.
-- xtcp.proto goes in the server's format_schemas directory.
CREATE TABLE xtcp.records_kafka
(
{columns}
)
ENGINE = Kafka
SETTINGS
    kafka_broker_list = '{brokers}',
    kafka_topic_list = '{topic}',
    kafka_group_name = 'clickhouse-xtcp',
    kafka_format = 'Protobuf',
    kafka_schema = 'xtcp.proto:Record';

-- Keeps the records. (hostname, instance, record_counter) names a record:
-- a record repeated by an at-least-once redelivery is merged away, while
-- another exporter run (a restart, a second exporter with the same
-- hostname) has its own instance, so its rows are kept.
CREATE TABLE xtcp.records
(
{columns},
{aliases}
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(intDiv(poll_timestamp_ns, 1000000000))
ORDER BY (hostname, instance, record_counter);

CREATE MATERIALIZED VIEW xtcp.records_mv TO xtcp.records AS
SELECT * FROM xtcp.records_kafka;
"""


if __name__ == "__main__":
    print(ddl(*sys.argv[1:3]), end="")
