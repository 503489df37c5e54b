"""An OTLP/HTTP metrics receiver for the tests: decodes each request with the
official OpenTelemetry protobuf definitions (the opentelemetry-proto
package) and prints it as one JSON line. Usage: otlp_receiver.py [STATUS]:
answers every request with STATUS (200 by default); prints "port N" once
listening on 127.0.0.1, and stops when its stdin closes."""

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

STATUS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
LOCK = threading.Lock()


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(key_values):
    return {kv.key: value(kv.value) for kv in key_values}


def points(metric):
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    out = []
    for p in data.data_points:
        point = {
            "attributes": attributes(p.attributes),
            "start": p.start_time_unix_nano,
            "time": p.time_unix_nano,
        }
        if kind == "histogram":
            point.update(
                count=p.count,
                sum=p.sum,
                buckets=list(p.bucket_counts),
                bounds=list(p.explicit_bounds),
            )
        else:
            point["value"] = getattr(p, p.WhichOneof("value"))
        out.append(point)
    shape = {"kind": kind, "temporality": data.aggregation_temporality}
    if kind == "sum":
        shape["monotonic"] = data.is_monotonic
    return shape, out


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        line = {
            "path": self.path,
            "content_type": self.headers.get("Content-Type"),
            "content_encoding": self.headers.get("Content-Encoding"),
            "resource": [],
            "metrics": [],
        }
        for rm in request.resource_metrics:
            line["resource"].append(attributes(rm.resource.attributes))
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    shape, pts = points(m)
                    line["metrics"].append(
                        dict(shape, name=m.name, unit=m.unit, scope=sm.scope.name, points=pts)
                    )
        # The whole request, as the library reads it, for anything not above.
        line["raw_fields"] = sorted(MessageToDict(request).keys())
        with LOCK:
            print(json.dumps(line), flush=True)
        answer = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(STATUS)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"port {server.server_address[1]}", flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
server.shutdown()
