"""The broker sync's sans-IO core: the state the registry grants, the plan that applies it, and the strict parsing of
what the broker answers (no broker here: states and bytes in, commands out)."""

from __future__ import annotations

import json

import pytest

from edge.errors import InputError
from edge.fleet.broker_sync import (
    CONTROL_TOPIC,
    DEFAULT_ACL_ACCESS,
    GATEWAY_ROLE,
    MAX_RESPONSE_BYTES,
    OPERATOR_ROLE,
    Acl,
    BrokerReader,
    BrokerResponseError,
    BrokerState,
    Client,
    Response,
    Role,
    check_results,
    chunk_commands,
    config_json,
    fleet_state,
    parse_responses,
    plan,
)

TOKEN = "abcd"


def grants(state: BrokerState, username: str) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for role in state.clients[username].roles:
        out |= {(a.acltype, a.topic) for a in state.roles[role].acls if a.allow}
    return out


def ok(command: str, n: int, data: dict | None = None, error: str | None = None) -> Response:
    return Response(command, f"{TOKEN}:{n}", error, data)


def test_a_device_gets_exactly_its_own_topics() -> None:
    state = fleet_state(["gateway-1"], ["operator"], ["cam-1", "cam-2"])
    assert grants(state, "cam-1") == {
        ("publishClientSend", "devices/cam-1/telemetry"),
        ("publishClientSend", "devices/cam-1/status"),
        ("publishClientSend", "devices/cam-1/replies"),
        ("subscribeLiteral", "devices/cam-1/commands"),
        ("publishClientReceive", "devices/cam-1/commands"),
        ("subscribeLiteral", "devices/cam-1/receipts"),
        ("publishClientReceive", "devices/cam-1/receipts"),
    }
    # A box receives its receipts but cannot write one: not even a retained fake on its own topic.
    assert ("publishClientSend", "devices/cam-1/receipts") not in grants(state, "cam-1")
    # No wildcard anywhere in a device's rights, and nothing of another device.
    assert not any("+" in t or "#" in t or "cam-2" in t for _, t in grants(state, "cam-1"))
    assert state.default_acl == DEFAULT_ACL_ACCESS
    assert not any(DEFAULT_ACL_ACCESS[k] for k in ("publishClientSend", "publishClientReceive", "subscribe"))


def test_gateway_and_operator_rights() -> None:
    state = fleet_state(["gateway-1", "gateway-2"], ["operator"], [])
    gw = grants(state, "gateway-1")
    assert ("subscribePattern", "$share/+/devices/+/telemetry") in gw
    assert ("publishClientSend", CONTROL_TOPIC) in gw and ("publishClientSend", "devices/+/commands") in gw
    assert ("publishClientSend", "devices/+/receipts") in gw
    assert not any(t.startswith("devices/+/telemetry") for a, t in gw if a.startswith("subscribe"))  # shared only
    assert grants(state, "gateway-2") == gw and state.clients["gateway-2"].roles == {GATEWAY_ROLE}
    assert grants(state, "operator") == {
        ("publishClientSend", "devices/+/commands"),
        ("subscribePattern", "devices/+/replies"),
        ("publishClientReceive", "devices/+/replies"),
    }
    assert state.clients["operator"].roles == {OPERATOR_ROLE}


def test_config_json_is_the_plugins_format_and_stable() -> None:
    state = fleet_state(["gw"], [], ["cam-1"])
    doc = json.loads(config_json(state))
    assert doc["defaultACLAccess"] == dict(DEFAULT_ACL_ACCESS)
    assert {"username": "cam-1", "roles": [{"rolename": "edge-device:cam-1"}]} in doc["clients"]
    role = next(r for r in doc["roles"] if r["rolename"] == "edge-device:cam-1")
    assert {"acltype": "subscribeLiteral", "topic": "devices/cam-1/commands", "priority": 0, "allow": True} in (
        role["acls"]
    )
    assert config_json(fleet_state(["gw"], [], ["cam-1"])) == config_json(state)


def test_plan_of_equal_states_is_empty() -> None:
    state = fleet_state(["gw"], ["op"], ["cam-1"])
    assert plan(state, state) == []


def test_plan_creates_an_enrolled_device_and_deletes_a_revoked_one_first() -> None:
    before = fleet_state(["gw"], [], ["cam-1", "cam-2"])
    after = fleet_state(["gw"], [], ["cam-2", "cam-3"])
    commands = plan(after, before)
    assert commands[0] == {"command": "deleteClient", "username": "cam-1"}  # the revoked box is kicked first
    names = [(c["command"], c.get("username") or c.get("rolename")) for c in commands]
    assert names == [
        ("deleteClient", "cam-1"),
        ("createRole", "edge-device:cam-3"),
        ("createClient", "cam-3"),
        ("deleteRole", "edge-device:cam-1"),
    ]
    create = commands[2]
    assert create["roles"] == [{"rolename": "edge-device:cam-3"}] and "password" not in create


def test_plan_replaces_whatever_someone_else_changed() -> None:
    want = fleet_state(["gw"], [], ["cam-1"])
    tampered_role = Role("edge-device:cam-1", frozenset({Acl("publishClientSend", "devices/#")}))
    actual = BrokerState(
        default_acl={**DEFAULT_ACL_ACCESS, "subscribe": True},
        roles={**want.roles, "edge-device:cam-1": tampered_role, "admin": Role("admin", frozenset())},
        clients={
            **want.clients,
            "cam-1": Client("cam-1", frozenset({"edge-device:cam-1", "admin"})),  # an extra role
            "gw": Client("gw", frozenset({GATEWAY_ROLE}), plain=False),  # e.g. in a group
            "intruder": Client("intruder", frozenset({GATEWAY_ROLE})),
        },
    )
    commands = plan(want, actual)
    by = [(c["command"], c.get("username") or c.get("rolename")) for c in commands]
    assert by == [
        ("deleteClient", "cam-1"),
        ("deleteClient", "gw"),
        ("deleteClient", "intruder"),
        ("setDefaultACLAccess", None),
        ("modifyRole", "edge-device:cam-1"),
        ("createClient", "cam-1"),
        ("createClient", "gw"),
        ("deleteRole", "admin"),
    ]
    assert {"acltype": "subscribe", "allow": False} in commands[3]["acls"]
    assert commands[4]["acls"] == want.roles["edge-device:cam-1"].acls_json()


def test_requests_are_chunked_in_order() -> None:
    commands = [{"command": "deleteClient", "username": f"cam-{i}"} for i in range(450)]
    chunks = list(chunk_commands(commands, max_commands=200))
    assert [len(c) for c in chunks] == [200, 200, 50]
    assert [c for chunk in chunks for c in chunk] == commands
    small = list(chunk_commands(commands, max_bytes=4096))
    assert all(len(json.dumps(c)) < 4096 + 200 for c in small) and sum(map(len, small)) == 450


def test_check_results_counts_conflicts_and_names_failures() -> None:
    commands = [
        {"command": "createClient", "username": "cam-1"},
        {"command": "deleteClient", "username": "cam-2"},
        {"command": "createRole", "rolename": "r"},
    ]
    responses = [
        ok("createClient", 1, error="Client already exists"),  # another gateway was faster
        ok("deleteClient", 2, error="Client not found"),
        ok("createRole", 3, error="Internal error"),
    ]
    failures, conflicts = check_results(commands, responses)
    assert conflicts == 2 and failures == ["createRole r: Internal error"]
    with pytest.raises(BrokerResponseError):
        check_results(commands[:1], [ok("deleteRole", 1)])  # a response to a command that was not sent


def role_json(name: str, topics: list[str]) -> dict:
    return {
        "rolename": name,
        "acls": [{"acltype": "publishClientSend", "topic": t, "priority": 0, "allow": True} for t in topics],
    }


def test_reader_pages_through_roles_and_clients() -> None:
    reader = BrokerReader(page_size=2)
    first = reader.requests()
    assert [c["command"] for c in first] == ["getDefaultACLAccess", "listRoles", "listClients"]
    assert first[1] == {"command": "listRoles", "verbose": True, "count": 2, "offset": 0}
    acls = [{"acltype": k, "allow": v} for k, v in DEFAULT_ACL_ACCESS.items()]
    reader.feed(first[0], ok("getDefaultACLAccess", 1, {"acls": acls}))
    reader.feed(first[1], ok("listRoles", 2, {"totalCount": 3, "roles": [role_json("a", ["x"]), role_json("b", [])]}))
    reader.feed(
        first[2],
        ok(
            "listClients",
            3,
            {"totalCount": 1, "clients": [{"username": "cam-1", "roles": [{"rolename": "a"}], "groups": []}]},
        ),
    )
    second = reader.requests()
    assert second == [{"command": "listRoles", "verbose": True, "count": 2, "offset": 2}]
    with pytest.raises(RuntimeError):
        reader.state()  # nothing is planned from a partial read
    reader.feed(second[0], ok("listRoles", 4, {"totalCount": 3, "roles": [role_json("c", ["y"])]}))
    assert reader.requests() == []
    state = reader.state()
    assert sorted(state.roles) == ["a", "b", "c"]
    assert state.roles["a"].acls == {Acl("publishClientSend", "x")}
    assert state.clients == {"cam-1": Client("cam-1", frozenset({"a"}))}
    assert state.default_acl == DEFAULT_ACL_ACCESS


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"totalCount": 1, "roles": "no"}, "a list"),
        ({"totalCount": "1", "roles": []}, "totalCount"),
        ({"totalCount": 10**9, "roles": []}, "more than the limit"),
        ({"totalCount": 1, "roles": [{"rolename": 5}]}, "rolename"),
        (
            {"totalCount": 1, "roles": [{"rolename": "a", "acls": [{"acltype": "x", "topic": "t", "allow": "yes"}]}]},
            "allow",
        ),
        ({"totalCount": 1, "roles": [{"rolename": "a" * 70000}]}, "rolename"),
        ({"totalCount": 3, "roles": [role_json("a", []), role_json("b", []), role_json("c", [])]}, "at most 2"),
    ],
)
def test_reader_rejects_malformed_role_pages(data: dict, why: str) -> None:
    reader = BrokerReader(page_size=2)
    with pytest.raises(BrokerResponseError, match=why):
        reader.feed(reader.requests()[1], ok("listRoles", 2, data))


def test_reader_refuses_an_error_response_and_a_mismatched_one() -> None:
    reader = BrokerReader()
    with pytest.raises(BrokerResponseError, match="Not authorized"):
        reader.feed(reader.requests()[1], ok("listRoles", 1, error="Not authorized"))
    with pytest.raises(BrokerResponseError, match="names command"):
        reader.feed(reader.requests()[1], ok("listClients", 1, {"totalCount": 0, "clients": []}))


def test_responses_of_other_gateways_are_skipped() -> None:
    payload = json.dumps(
        {
            "responses": [
                {"command": "deleteClient", "correlationData": "other:1"},
                {"command": "deleteClient", "correlationData": f"{TOKEN}:7", "error": "Client not found"},
                {"command": "Unknown command", "error": "Missing command"},
            ]
        }
    ).encode()
    assert parse_responses(payload, TOKEN) == [Response("deleteClient", f"{TOKEN}:7", "Client not found", None)]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'{"responses": {}}',
        b'{"responses": [1]}',
        json.dumps({"responses": [{"command": 1, "correlationData": f"{TOKEN}:1"}]}).encode(),
        json.dumps({"responses": [{"command": "x", "correlationData": f"{TOKEN}:1", "data": []}]}).encode(),
        json.dumps({"responses": [{"command": "x", "correlationData": f"{TOKEN}:1", "error": 3}]}).encode(),
        json.dumps({"responses": [{}] * 1001}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # nesting meant to exhaust the parser's stack
        b'{"responses": []' + b" " * MAX_RESPONSE_BYTES + b"}",
    ],
)
def test_malformed_response_messages_rejected(payload: bytes) -> None:
    with pytest.raises(BrokerResponseError) as info:
        parse_responses(payload, TOKEN)
    assert isinstance(info.value, InputError)  # outside input: one fault root
