"""The management HTTP API, run against RabbitMQ 3.10's management plugin and against Rill:
the same requests, the same status codes, bodies and JSON field names.

Every test runs twice (``api`` is parametrised): once against a private RabbitMQ node with
``rabbitmq_management`` enabled, once against ``rill server``. Where RabbitMQ's values are
its own (node names, Erlang versions, memory figures) the tests compare field names and
JSON types; where they are the broker's state (counts, arguments, bindings) they compare
values.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pika
import pytest

from conftest import uniq


@dataclass
class Api:
    kind: str
    amqp_url: str
    http_url: str

    def request(self, method: str, path: str, auth: tuple[str, str] | None = ("guest", "guest"),
                body: object | None = None) -> tuple[int, dict[str, str], object | None]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                status, headers, raw = res.status, dict(res.headers), res.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, dict(e.headers), e.read()
        return status, {k.lower(): v for k, v in headers.items()}, (json.loads(raw) if raw else None)

    def request_raw(self, method: str, path: str, data: bytes) -> tuple[int, object | None]:
        """A request with exactly `data` as its JSON body (malformed on purpose)."""
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        token = base64.b64encode(b"guest:guest").decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as res:
                status, raw = res.status, res.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        return status, (json.loads(raw) if raw else None)

    def get(self, path: str) -> object:
        status, _, body = self.request("GET", path)
        assert status == 200, (self.kind, path, status, body)
        return body


@pytest.fixture(scope="module")
def rabbitmq_management(tmp_path_factory):
    import rabbitnode  # here: it imports conftest's helpers

    if not rabbitnode.available():
        pytest.skip("rabbitmq-server is not installed")
    node = rabbitnode.RabbitNode(tmp_path_factory.mktemp("rabbitmq-mgmt"), management=True).start()
    yield node
    node.stop()


@pytest.fixture(params=["rabbitmq", "rill"])
def api(request, make_broker) -> Api:
    if request.param == "rabbitmq":
        node = request.getfixturevalue("rabbitmq_management")
        return Api("rabbitmq", node.url, node.http_url)
    broker = make_broker()
    return Api("rill", broker.url, broker.http_url)


def declare(api: Api, queue: str, exchange: str, messages: int) -> None:
    with pika.BlockingConnection(pika.URLParameters(api.amqp_url)) as c:
        ch = c.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-max-length": 10})
        ch.exchange_declare(exchange, "direct", durable=True)
        ch.queue_bind(queue, exchange, "k")
        ch.queue_bind(queue, exchange, "h", arguments={"x-match": "all"})
        ch.confirm_delivery()
        for i in range(messages):
            ch.basic_publish(exchange, "k", f"m{i}".encode())


def eventually(fetch, ok, timeout: float = 20.0):
    """RabbitMQ refreshes its statistics every 5 s: poll until `ok(fetch())`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def same_kind(a: object, b: object) -> bool:
    """Both JSON values of one type (any number counts as a number)."""
    num = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, num) and isinstance(b, num):
        return True
    return a is None or b is None or type(a) is type(b)


# The fields Rill must serve, as RabbitMQ names them.
QUEUE_FIELDS = {"name", "vhost", "durable", "auto_delete", "exclusive", "arguments", "node",
                "state", "type", "consumers", "memory", "messages", "messages_details",
                "messages_ready", "messages_ready_details", "messages_unacknowledged",
                "messages_unacknowledged_details", "message_stats", "policy",
                "exclusive_consumer_tag", "single_active_consumer_tag"}
EXCHANGE_FIELDS = {"name", "vhost", "type", "durable", "auto_delete", "internal", "arguments",
                   "user_who_performed_action"}
BINDING_FIELDS = {"source", "vhost", "destination", "destination_type", "routing_key",
                  "arguments", "properties_key"}


def test_whoami_and_authentication(api):
    assert api.get("/api/whoami") == {"name": "guest", "tags": ["administrator"]}
    status, headers, body = api.request("GET", "/api/overview", auth=None)
    assert status == 401 and body is None
    assert headers["www-authenticate"] == 'Basic realm="RabbitMQ Management"'
    status, _, body = api.request("GET", "/api/whoami", auth=("guest", "wrong"))
    assert (status, body) == (401, {"error": "not_authorized", "reason": "Login failed"})
    status, _, body = api.request("GET", "/api/whoami", auth=("nobody", "guest"))
    assert (status, body) == (401, {"error": "not_authorized", "reason": "Login failed"})


def test_a_queue_shows_its_messages_arguments_and_stats(api):
    q, x = uniq("mq"), uniq("mx")
    declare(api, q, x, 3)
    path = f"/api/queues/%2F/{q}"
    got = eventually(lambda: api.get(path),
                     lambda b: b.get("messages") == 3 and b.get("message_stats", {}).get("publish") == 3)
    missing = QUEUE_FIELDS - set(got)
    assert not missing, (api.kind, missing)
    assert got["name"] == q and got["vhost"] == "/"
    assert (got["durable"], got["auto_delete"], got["exclusive"]) == (True, False, False)
    assert got["arguments"] == {"x-max-length": 10}
    assert (got["messages"], got["messages_ready"], got["messages_unacknowledged"]) == (3, 3, 0)
    assert got["consumers"] == 0 and got["state"] == "running" and got["type"] == "classic"
    assert got["message_stats"]["publish"] == 3
    assert set(got["message_stats"]["publish_details"]) == {"rate"}
    assert set(got["messages_details"]) == {"rate"}
    for extra in ("consumer_details", "deliveries", "incoming"):
        assert got[extra] == [], extra
    listed = [e for e in api.get("/api/queues/%2F") if e["name"] == q]
    assert len(listed) == 1 and listed[0]["messages"] == 3
    assert any(e["name"] == q for e in api.get("/api/queues"))


def test_exchanges_and_bindings(api):
    q, x = uniq("bq"), uniq("bx")
    declare(api, q, x, 0)
    got = api.get(f"/api/exchanges/%2F/{x}")
    assert EXCHANGE_FIELDS <= set(got), (api.kind, EXCHANGE_FIELDS - set(got))
    assert {k: got[k] for k in ("name", "vhost", "type", "durable", "auto_delete", "internal",
                                "arguments")} == {
        "name": x, "vhost": "/", "type": "direct", "durable": True, "auto_delete": False,
        "internal": False, "arguments": {}}
    assert (got["incoming"], got["outgoing"]) == ([], [])
    builtin = api.get("/api/exchanges/%2F/amq.topic")
    assert (builtin["type"], builtin["user_who_performed_action"]) == ("topic", "rmq-internal")
    names = [e["name"] for e in api.get("/api/exchanges/%2F")]
    assert "" in names and "amq.direct" in names and x in names
    bindings = api.get(f"/api/queues/%2F/{q}/bindings")
    assert all(set(b) == BINDING_FIELDS for b in bindings), bindings
    assert bindings == [
        {"source": "", "vhost": "/", "destination": q, "destination_type": "queue",
         "routing_key": q, "arguments": {}, "properties_key": q},
        *sorted([
            {"source": x, "vhost": "/", "destination": q, "destination_type": "queue",
             "routing_key": "h", "arguments": {"x-match": "all"},
             "properties_key": next(b["properties_key"] for b in bindings if b["routing_key"] == "h")},
            {"source": x, "vhost": "/", "destination": q, "destination_type": "queue",
             "routing_key": "k", "arguments": {}, "properties_key": "k"},
        ], key=lambda b: b["routing_key"]),
    ]
    assert all(b in api.get("/api/bindings") for b in bindings)
    assert all(b in api.get("/api/bindings/%2F") for b in bindings)


def test_vhosts_and_overview(api):
    vhosts = api.get("/api/vhosts")
    root = next(v for v in vhosts if v["name"] == "/")
    assert {k: root[k] for k in ("name", "description", "tags", "tracing", "default_queue_type")} == {
        "name": "/", "description": "Default virtual host", "tags": [], "tracing": False,
        "default_queue_type": "undefined"}
    assert list(root["cluster_state"].values()) == ["running"]
    assert api.get("/api/vhosts/%2F")["name"] == "/"
    o = api.get("/api/overview")
    for k in ("management_version", "rates_mode", "exchange_types", "product_version",
              "product_name", "rabbitmq_version", "cluster_name", "node", "message_stats",
              "queue_totals", "object_totals", "listeners", "disable_stats",
              "enable_queue_totals", "statistics_db_event_queue"):
        assert k in o, (api.kind, k)
    assert o["rates_mode"] == "basic"
    types = {t["name"] for t in o["exchange_types"]}
    assert {"direct", "fanout", "headers", "topic"} <= types
    assert {"connections", "consumers", "exchanges", "queues"} <= set(o["object_totals"])
    assert any(listener["protocol"] == "http" for listener in o["listeners"])


def test_unknown_objects_are_404_with_rabbitmqs_body(api):
    for path in ("/api/vhosts/nope", "/api/queues/nope", "/api/queues/%2F/nope",
                 "/api/exchanges/%2F/nope", "/api/exchanges/nope", "/api/bindings/nope",
                 "/api/no-such-path"):
        status, _, body = api.request("GET", path)
        assert (status, body) == (404, {"error": "Object Not Found", "reason": "Not Found"}), (
            api.kind, path)
    # RabbitMQ's quirks: a missing queue still has its default binding; a missing vhost none.
    assert api.get("/api/queues/%2F/nope/bindings") == [
        {"source": "", "vhost": "/", "destination": "nope", "destination_type": "queue",
         "routing_key": "nope", "arguments": {}, "properties_key": "nope"}]
    assert api.get("/api/queues/nope/nope/bindings") == []


def test_rill_serves_only_rabbitmq_field_names(make_broker, rabbitmq_management):
    """Every field Rill serves for a queue, an exchange, a vhost and the overview exists in
    RabbitMQ's answer with the same JSON type: Rill invents no names."""
    broker = make_broker()
    rill = Api("rill", broker.url, broker.http_url)
    rabbit = Api("rabbitmq", rabbitmq_management.url, rabbitmq_management.http_url)
    q, x = uniq("fq"), uniq("fx")
    pairs = []
    for a in (rill, rabbit):
        declare(a, q, x, 1)
    wait = lambda a: eventually(lambda: a.get(f"/api/queues/%2F/{q}"),  # noqa: E731
                                lambda b: b.get("message_stats", {}).get("publish") == 1)
    pairs.append(("queue", wait(rill), wait(rabbit)))
    pairs.append(("exchange", rill.get(f"/api/exchanges/%2F/{x}"), rabbit.get(f"/api/exchanges/%2F/{x}")))
    pairs.append(("vhost", rill.get("/api/vhosts/%2F"), rabbit.get("/api/vhosts/%2F")))
    pairs.append(("overview", rill.get("/api/overview"), rabbit.get("/api/overview")))

    def check(what: str, ours: object, theirs: object, path: str) -> None:
        if isinstance(ours, dict) and isinstance(theirs, dict):
            if what == "overview" and path.endswith("message_stats"):
                # RabbitMQ's overview is {} until something is published node-wide.
                return
            for k, v in ours.items():
                if path.endswith("cluster_state") or path.endswith("arguments"):
                    continue  # keys are node names / argument names
                assert k in theirs, f"{what}: {path}.{k} is not a RabbitMQ field"
                assert same_kind(v, theirs[k]), f"{what}: {path}.{k}: {v!r} vs {theirs[k]!r}"
                check(what, v, theirs[k], f"{path}.{k}")

    for what, ours, theirs in pairs:
        check(what, ours, theirs, what)


def test_create_purge_and_delete_queues_exchanges_and_bindings(api):
    q, x = uniq("wq"), uniq("wx")
    put = lambda path, body: api.request("PUT", path, body=body)  # noqa: E731
    assert put(f"/api/queues/%2F/{q}", {"durable": True, "arguments": {"x-max-length": 5}})[0] == 201
    assert put(f"/api/queues/%2F/{q}", {"durable": True, "arguments": {"x-max-length": 5}})[0] == 204
    got = api.get(f"/api/queues/%2F/{q}")
    assert (got["durable"], got["auto_delete"], got["arguments"]) == (True, False, {"x-max-length": 5})
    status, _, body = put(f"/api/queues/%2F/{q}", {"durable": False, "arguments": {"x-max-length": 5}})
    assert (status, body) == (400, {"error": "bad_request", "reason":
        f"inequivalent arg 'durable' for queue '{q}' in vhost '/': received 'false' but current is 'true'"})
    status, _, body = put(f"/api/queues/%2F/{q}2", {"durable": "yes"})
    assert (status, body) == (400, {"error": "bad_request", "reason": ["not_boolean", "yes"]})
    status, _, body = api.request("PUT", "/api/queues/nope/x", body={})
    assert (status, body) == (404, {"error": "not_found", "reason": "vhost_not_found"})
    assert put(f"/api/queues/%2F/{q}3", {})[0] == 201
    assert api.get(f"/api/queues/%2F/{q}3")["durable"] is False

    assert put(f"/api/exchanges/%2F/{x}", {"type": "topic", "durable": True})[0] == 201
    assert put(f"/api/exchanges/%2F/{x}", {"type": "topic", "durable": True})[0] == 204
    assert api.get(f"/api/exchanges/%2F/{x}")["type"] == "topic"
    status, _, body = put(f"/api/exchanges/%2F/{x}2", {"type": "nope"})
    assert (status, body) == (400, {"error": "bad_request", "reason": "unknown exchange type 'nope'"})
    assert put(f"/api/exchanges/%2F/{x}3", {})[0] == 201
    assert api.get(f"/api/exchanges/%2F/{x}3")["type"] == "direct"

    path = f"/api/bindings/%2F/e/{x}/q/{q}"
    status, headers, body = api.request("POST", path, body={"routing_key": "a.b", "arguments": {}})
    assert (status, headers.get("location"), body) == (201, f"{q}/a.b", None)
    listed = api.get(path)
    assert [(b["routing_key"], b["properties_key"]) for b in listed] == [("a.b", "a.b")]
    assert api.get(f"{path}/a.b")["destination"] == q
    status, _, body = api.request("POST", f"/api/bindings/%2F/e/nope/q/{q}", body={"routing_key": "k"})
    assert (status, body) == (404, {"error": "not_found", "reason": "no exchange 'nope' in vhost '/'"})
    status, _, body = api.request("POST", f"/api/bindings/%2F/e/{x}/q/nope", body={"routing_key": "k"})
    assert (status, body) == (404, {"error": "not_found", "reason": "no queue 'nope' in vhost '/'"})
    assert api.request("DELETE", f"{path}/a.b")[0] == 204
    assert api.request("DELETE", f"{path}/a.b")[0] == 404
    assert api.get(path) == []

    with pika.BlockingConnection(pika.URLParameters(api.amqp_url)) as c:
        ch = c.channel()
        ch.confirm_delivery()
        for i in range(2):
            ch.basic_publish("", q, f"m{i}".encode())
    # RabbitMQ shows no counts for a new queue until its statistics come in.
    messages = lambda: api.get(f"/api/queues/%2F/{q}").get("messages")  # noqa: E731
    assert eventually(messages, lambda n: n == 2) == 2
    assert api.request("DELETE", f"/api/queues/%2F/{q}/contents")[0] == 204
    assert eventually(messages, lambda n: n == 0) == 0

    assert api.request("DELETE", f"/api/queues/%2F/{q}")[0] == 204
    assert api.request("DELETE", f"/api/queues/%2F/{q}")[0] == 404
    assert api.request("DELETE", f"/api/exchanges/%2F/{x}")[0] == 204
    assert api.request("DELETE", f"/api/exchanges/%2F/{x}")[0] == 404
    status, _, body = api.request("DELETE", "/api/exchanges/%2F/amq.direct")
    assert (status, body) == (401, {"error": "not_authorised", "reason": "Access refused."})
    # No body at all is an empty object.
    assert api.request("PUT", f"/api/queues/%2F/{q}", body=None)[0] == 201
    req_status = api.request_raw("PUT", f"/api/queues/%2F/{q}4", b'{"durable":')
    assert req_status == (400, {"error": "bad_request", "reason": "not_json"})


def test_durable_objects_made_over_http_survive_a_restart(make_broker):
    broker = make_broker()
    api = Api("rill", broker.url, broker.http_url)
    q, x = uniq("dq"), uniq("dx")
    assert api.request("PUT", f"/api/queues/%2F/{q}", body={"durable": True})[0] == 201
    assert api.request("PUT", f"/api/exchanges/%2F/{x}", body={"type": "fanout", "durable": True})[0] == 201
    assert api.request("POST", f"/api/bindings/%2F/e/{x}/q/{q}", body={"routing_key": "r"})[0] == 201
    broker.kill()
    broker.start()
    assert api.get(f"/api/queues/%2F/{q}")["durable"] is True
    assert api.get(f"/api/exchanges/%2F/{x}")["type"] == "fanout"
    assert [b["routing_key"] for b in api.get(f"/api/bindings/%2F/e/{x}/q/{q}")] == ["r"]


def test_publish_and_get_messages_over_http(api):
    q = uniq("gq")
    assert api.request("PUT", f"/api/queues/%2F/{q}", body={})[0] == 201
    publish = lambda x, body: api.request("POST", f"/api/exchanges/%2F/{x}/publish", body=body)  # noqa: E731
    props = {"delivery_mode": 2, "headers": {"h": 1}, "content_type": "text/plain"}
    status, _, body = publish("amq.default", {"properties": props, "routing_key": q,
                                              "payload": "hello", "payload_encoding": "string"})
    assert (status, body) == (200, {"routed": True})
    assert api.request("POST", "/api/exchanges/%2F/amq.default/publish", body={
        "properties": {}, "routing_key": "nowhere", "payload": "x", "payload_encoding": "string"})[2] == {"routed": False}
    assert api.request("POST", "/api/exchanges/%2F/amq.default/publish", body={
        "properties": {}, "routing_key": q, "payload": "aGk=", "payload_encoding": "base64"})[2] == {"routed": True}
    status, _, body = api.request("POST", "/api/exchanges/%2F/amq.default/publish", body={
        "properties": {}, "routing_key": q, "payload": "x"})
    assert (status, body) == (400, {"error": "bad_request", "reason": "[{key_missing,payload_encoding}]"})
    status, _, body = api.request("POST", "/api/exchanges/%2F/amq.default/publish", body={})
    assert (status, body) == (400, {"error": "bad_request", "reason":
        "[{key_missing,routing_key},\n {key_missing,properties},\n {key_missing,payload},\n"
        " {key_missing,payload_encoding}]"})
    status, _, body = api.request("POST", "/api/exchanges/%2F/nope/publish", body={
        "properties": {}, "routing_key": q, "payload": "x", "payload_encoding": "string"})
    assert (status, body) == (400, {"error": "bad_request",
                                    "reason": "404 NOT_FOUND - no exchange 'nope' in vhost '/'"})

    get = lambda body: api.request("POST", f"/api/queues/%2F/{q}/get", body=body)  # noqa: E731
    status, _, got = get({"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto",
                          "truncate": 50000})
    assert status == 200
    assert got == [
        {"payload_bytes": 5, "redelivered": False, "exchange": "", "routing_key": q,
         "message_count": 1, "properties": props, "payload": "hello", "payload_encoding": "string"},
        {"payload_bytes": 2, "redelivered": False, "exchange": "", "routing_key": q,
         "message_count": 0, "properties": [], "payload": "hi", "payload_encoding": "string"},
    ]
    _, _, got = get({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"})
    assert [(m["payload"], m["redelivered"], m["message_count"]) for m in got] == [("hello", True, 1)]
    _, _, got = get({"count": 1, "ackmode": "ack_requeue_true", "encoding": "base64"})
    assert [(m["payload"], m["payload_encoding"], m["redelivered"]) for m in got] == [
        ("aGk=", "base64", True)]
    status, _, body = get({})
    assert (status, body) == (400, {"error": "bad_request", "reason":
        "[{key_missing,ackmode},{key_missing,count},{key_missing,encoding}]"})
    status, _, body = api.request("POST", "/api/queues/%2F/nope/get",
                                  body={"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"})
    assert (status, body) == (404, {"error": "not_found",
                                    "reason": "NOT_FOUND - no queue 'nope' in vhost '/'"})


@pytest.fixture(scope="module")
def rabbitmqadmin(rabbitmq_management, tmp_path_factory):
    """RabbitMQ's own `rabbitmqadmin`, as its management plugin serves it."""
    path = tmp_path_factory.mktemp("cli") / "rabbitmqadmin"
    req = urllib.request.Request(rabbitmq_management.http_url + "/cli/rabbitmqadmin")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=10) as res:
        path.write_bytes(res.read())
    return path


def test_rabbitmqadmin_lists_declares_publishes_gets_and_deletes(api, rabbitmqadmin):
    import subprocess
    import sys
    import urllib.parse

    port = str(urllib.parse.urlparse(api.http_url).port)

    def admin(*args: str) -> str:
        res = subprocess.run([sys.executable, str(rabbitmqadmin), "-H", "127.0.0.1", "-P", port,
                              "-u", "guest", "-p", "guest", *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (api.kind, args, res.stdout, res.stderr)
        return res.stdout

    def names(table: str) -> list[str]:
        """The cells of a one-column table (padded to the longest name)."""
        return [line.strip("| ").strip() for line in table.splitlines() if line.startswith("|")]

    q, x = uniq("aq"), uniq("ax")
    assert "queue declared" in admin("declare", "queue", f"name={q}", "durable=true")
    assert "exchange declared" in admin("declare", "exchange", f"name={x}", "type=fanout")
    assert "binding declared" in admin("declare", "binding", f"source={x}", f"destination={q}")
    assert "Message published" in admin("publish", f"exchange={x}", "routing_key=any",
                                         "payload=hello")
    assert q in names(admin("list", "queues", "name"))
    rows = [line for line in admin("list", "bindings", "source", "destination").splitlines()
            if q in line]
    assert len(rows) == 2, rows  # the default exchange's and x's
    got = admin("-f", "raw_json", "get", f"queue={q}", "ackmode=ack_requeue_false")
    assert [(m["payload"], m["exchange"]) for m in json.loads(got)] == [("hello", x)]
    assert "queue purged" in admin("purge", "queue", f"name={q}")
    assert "exchange deleted" in admin("delete", "exchange", f"name={x}")
    assert "queue deleted" in admin("delete", "queue", f"name={q}")
    assert q not in names(admin("list", "queues", "name"))


def test_health_checks(api):
    for path in ("/api/health/checks/alarms", "/api/health/checks/local-alarms",
                 "/api/health/checks/virtual-hosts", "/api/aliveness-test/%2F"):
        assert api.get(path) == {"status": "ok"}, (api.kind, path)
    status, _, body = api.request("GET", "/api/aliveness-test/nope")
    assert (status, body) == (404, {"error": "Object Not Found", "reason": "Not Found"})
    import urllib.parse
    amqp_port = urllib.parse.urlparse(api.amqp_url).port
    assert api.get(f"/api/health/checks/port-listener/{amqp_port}") == {"status": "ok",
                                                                        "port": amqp_port}
    status, _, body = api.request("GET", "/api/health/checks/port-listener/1")
    assert status == 503
    assert (body["status"], body["reason"], body["missing"]) == ("failed", "No active listener", 1)
    assert amqp_port in body["ports"]
    status, _, body = api.request("GET", "/api/health/checks/alarms", auth=None)
    assert status == 401


def test_a_resource_alarm_fails_the_alarm_checks(request, make_broker):
    rabbit = request.getfixturevalue("rabbitmq_management")
    rill = make_broker(extra_args=["--memory-high-watermark", "0.0000001"])
    rabbit.ctl("set_vm_memory_high_watermark", "0.00001")
    try:
        for api in (Api("rabbitmq", rabbit.url, rabbit.http_url), Api("rill", rill.url, rill.http_url)):
            for path, where in (("alarms", "in the cluster"), ("local-alarms", "on the node")):
                status, _, body = eventually(
                    lambda: api.request("GET", f"/api/health/checks/{path}"),
                    lambda r: r[0] == 503)
                assert status == 503, (api.kind, path, body)
                assert body["status"] == "failed"
                assert body["reason"] == f"There are alarms in effect {where}"
                assert [a["resource"] for a in body["alarms"]] == ["memory"]
                assert set(body["alarms"][0]) == {"node", "resource"}
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")


def test_definitions_exported_from_rill_import_into_rabbitmq(make_broker, rabbitmq_management):
    broker = make_broker()
    rill = Api("rill", broker.url, broker.http_url)
    rabbit = Api("rabbitmq", rabbitmq_management.url, rabbitmq_management.http_url)
    q, x = uniq("eq"), uniq("ex")
    declare(rill, q, x, 0)
    exported = rill.get("/api/definitions")
    assert set(exported) == set(rabbit.get("/api/definitions"))
    assert {"name": q, "vhost": "/", "durable": True, "auto_delete": False,
            "arguments": {"x-max-length": 10}} in exported["queues"]
    assert any(e["name"] == x and e["type"] == "direct" for e in exported["exchanges"])
    assert not any(e["name"].startswith("amq.") or e["name"] == "" for e in exported["exchanges"])
    assert {b["routing_key"] for b in exported["bindings"] if b["source"] == x} == {"k", "h"}
    guest = next(u for u in exported["users"] if u["name"] == "guest")
    assert guest["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert guest["tags"] == ["administrator"]
    # RabbitMQ takes the file as it is; guest's password still works after its hash was
    # replaced by Rill's, so the hash is RabbitMQ's salted SHA-256 of the same password.
    status, _, body = rabbit.request("POST", "/api/definitions", body=exported)
    assert status in (200, 201, 204), (status, body)
    assert rabbit.get("/api/whoami")["name"] == "guest"
    assert rabbit.get(f"/api/queues/%2F/{q}")["arguments"] == {"x-max-length": 10}
    assert rabbit.get(f"/api/exchanges/%2F/{x}")["type"] == "direct"
    assert {b["routing_key"] for b in rabbit.get(f"/api/bindings/%2F/e/{x}/q/{q}")} == {"k", "h"}


def test_users_and_permissions(api):
    users = api.get("/api/users")
    guest = next(u for u in users if u["name"] == "guest")
    assert set(guest) == {"name", "password_hash", "hashing_algorithm", "tags", "limits"}
    assert (guest["hashing_algorithm"], guest["tags"], guest["limits"]) == (
        "rabbit_password_hashing_sha256", ["administrator"], {})
    assert len(base64.b64decode(guest["password_hash"])) == 36  # 4-byte salt + SHA-256
    assert api.get("/api/users/guest")["name"] == "guest"
    full = {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
    assert full in api.get("/api/permissions")
    assert full in api.get("/api/users/guest/permissions")
    assert full in api.get("/api/vhosts/%2F/permissions")
    assert api.get("/api/permissions/%2F/guest") == full
    assert api.get("/api/users/without-permissions") == []
    for path in ("/api/users/nope", "/api/permissions/%2F/nope", "/api/permissions/nope/guest"):
        status, _, body = api.request("GET", path)
        assert (status, body) == (404, {"error": "Object Not Found", "reason": "Not Found"}), path
