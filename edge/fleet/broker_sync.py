"""The broker's access rules, derived from the fleet registry and kept equal to it while a gateway runs.

The registry (``edge.fleet.pki.registry``) is the only source of truth. From it ``fleet_state`` derives the state of
mosquitto's dynamic-security plugin: one role and one client per enrolled, non-revoked device, one shared role for
the gateway identities and one for the operator identities, and default access "deny" for everything except
unsubscribing. The registry writes that state as the plugin's JSON file (``config_json``), which a broker loads
when it (re)starts; a running gateway applies it live through ``$CONTROL/dynamic-security/v1`` (``BrokerSync``), so
an enroll or a revoke takes effect within seconds, without a broker restart.

The rights (the box's topics are those of ``edge.telemetry.device``; every other topic is denied)::

    identity       publish                                      subscribe and receive
    device <id>    devices/<id>/telemetry, status, replies     devices/<id>/commands, devices/<id>/receipts
    gateway        devices/+/commands, devices/+/receipts,      $share/+/devices/+/telemetry, devices/+/status,
                   $CONTROL/dynamic-security/v1                 $CONTROL/dynamic-security/v1/response
    operator       devices/+/commands                           devices/+/replies

Only the listener binds an identity to a client id (``use_username_as_clientid``: the client id is the CN of the
certificate) and mosquitto 2.0.11's plugin has no ``%u`` substitution, hence one role per device.

The sans-IO core (``fleet_state``, ``config_json``, ``BrokerReader``, ``plan``, ``parse_responses``,
``check_results``, ``chunk_commands``) takes states and bytes and returns commands or raises; ``BrokerSync`` alone
talks to the broker, over the gateway's ``MqttTransport``.

Invariants:
- The registry owns the plugin's state entirely: a client or role it does not name is deleted (deleting a client
  disconnects it), one that differs is replaced, and the default access is reset to deny.
- Nothing is planned from a partial read: the broker's whole state (default access, every role, every client,
  page by page) is read first.
- Responses are not trusted: each message is bounded (``MAX_RESPONSE_BYTES``) and parsed strictly (types, counts
  and lengths checked); only responses carrying this process's correlation token are considered (the plugin
  publishes every response to every subscriber of the response topic, i.e. to every gateway).
- Applying is idempotent: another gateway applying the same registry at the same moment makes some commands fail
  with "already exists" or "not found"; those count as done, and the state is read and compared again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from edge.errors import EdgeError, InputError, TransportError
from edge.log import event

if TYPE_CHECKING:
    from edge.mqtt import Incoming, MqttTransport

__all__ = [
    "CONTROL_TOPIC",
    "DEFAULT_ACL_ACCESS",
    "DEVICE_ROLE_PREFIX",
    "GATEWAY_ROLE",
    "OPERATOR_ROLE",
    "RESPONSE_TOPIC",
    "Acl",
    "BrokerReader",
    "BrokerResponseError",
    "BrokerState",
    "BrokerSync",
    "BrokerSyncError",
    "Client",
    "Response",
    "Role",
    "check_results",
    "chunk_commands",
    "config_json",
    "fleet_state",
    "parse_responses",
    "plan",
]

log = logging.getLogger("edge.fleet.broker_sync")

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
GATEWAY_ROLE: Final = "edge-gateway"
OPERATOR_ROLE: Final = "edge-operator"
DEVICE_ROLE_PREFIX: Final = "edge-device:"

PUBLISH_SEND: Final = "publishClientSend"
PUBLISH_RECEIVE: Final = "publishClientReceive"
SUBSCRIBE_LITERAL: Final = "subscribeLiteral"
SUBSCRIBE_PATTERN: Final = "subscribePattern"
_ACL_TYPES: Final = frozenset(
    {PUBLISH_SEND, PUBLISH_RECEIVE, SUBSCRIBE_LITERAL, SUBSCRIBE_PATTERN, "unsubscribeLiteral", "unsubscribePattern"}
)
# Everything not granted by a role is denied, except unsubscribing (harmless, and a client must be able to undo).
DEFAULT_ACL_ACCESS: Final[Mapping[str, bool]] = {
    PUBLISH_SEND: False,
    PUBLISH_RECEIVE: False,
    "subscribe": False,
    "unsubscribe": True,
}

# Limits on what the broker sends back (a page of 500 verbose roles is about 250 KB).
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
MAX_RESPONSES: Final = 1000  # responses in one message: at most the commands of one request
MAX_ENTRIES: Final = 500_000  # roles or clients in the broker: two per device, and a fleet of 250k boxes
MAX_ACLS: Final = 256  # per role; ours have at most 7
MAX_STRING: Final = 65535  # an MQTT string (a username, a topic filter)
PAGE_SIZE: Final = 500
# One request stays well under the listener's max_packet_size (edge.fleet.pki.registry.MAX_PACKET_BYTES).
MAX_REQUEST_BYTES: Final = 128 * 1024
MAX_COMMANDS_PER_REQUEST: Final = 200
_BENIGN: Final = frozenset(
    {
        ("createClient", "Client already exists"),
        ("deleteClient", "Client not found"),
        ("createRole", "Role already exists"),
        ("deleteRole", "Role not found"),
    }
)
_PASSES: Final = 3


class BrokerResponseError(InputError):
    """A message on the dynamic-security response topic is malformed or exceeds a limit."""


class BrokerSyncError(TransportError):
    """The broker refused a dynamic-security request, did not answer it, or reported that a command failed."""


# -- the state ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Acl:
    """One ACL entry of a role (``acltype`` as the plugin names it)."""

    acltype: str
    topic: str
    allow: bool = True
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        """The entry as the plugin's JSON (config file and commands)."""
        return {"acltype": self.acltype, "topic": self.topic, "priority": self.priority, "allow": self.allow}


@dataclass(frozen=True, slots=True)
class Role:
    """A named set of ACL entries (their order is irrelevant: all have the same priority)."""

    name: str
    acls: frozenset[Acl]

    def acls_json(self) -> list[dict[str, Any]]:
        """The entries as the plugin's JSON, in a stable order."""
        return [a.to_json() for a in sorted(self.acls)]


@dataclass(frozen=True, slots=True)
class Client:
    """A client of the plugin, keyed by username (the certificate's CN).

    Attributes:
        username: the identity.
        roles: the names of its roles.
        plain: no groups, no client id restriction, not disabled: what this module creates. A client that is not
            plain was changed by someone else and is replaced.
    """

    username: str
    roles: frozenset[str]
    plain: bool = True


@dataclass(frozen=True, slots=True)
class BrokerState:
    """The plugin's whole state as far as access goes: default access, roles, clients (by name).

    ``registered``: for a state derived from a registry, how many devices it has ever enrolled (revoked ones
    included); None for a state read from the broker.
    """

    default_acl: Mapping[str, bool] = field(default_factory=lambda: dict(DEFAULT_ACL_ACCESS))
    roles: Mapping[str, Role] = field(default_factory=dict)
    clients: Mapping[str, Client] = field(default_factory=dict)
    registered: int | None = None


def device_role(device_id: str) -> str:
    """The role name of a device."""
    return DEVICE_ROLE_PREFIX + device_id


def _role(name: str, entries: Iterable[tuple[str, str]]) -> Role:
    return Role(name, frozenset(Acl(t, topic) for t, topic in entries))


def fleet_state(
    gateways: Iterable[str],
    operators: Iterable[str],
    devices: Iterable[str],
    suspended: Iterable[str] = (),
) -> BrokerState:
    """The plugin state a fleet needs (see the module docstring for the rights).

    Args:
        gateways: gateway identities (already validated, disjoint from the others).
        operators: operator identities (``edge fleet command``).
        devices: enrolled, non-revoked device ids.
        suspended: devices whose suspension is in force (``edge.fleet.suspend``): like a revoked device, such a
            box has no client, so it may still complete a TLS handshake but can neither publish nor subscribe.
            (``disableClient`` would not do: with certificate identities mosquitto 2.0.11 kicks a disabled client
            but lets it connect again and publish at once, measured.)

    Returns:
        The state.
    """
    roles = {
        GATEWAY_ROLE: _role(
            GATEWAY_ROLE,
            [
                (SUBSCRIBE_PATTERN, "$share/+/devices/+/telemetry"),
                (PUBLISH_RECEIVE, "devices/+/telemetry"),
                (SUBSCRIBE_LITERAL, "devices/+/status"),
                (PUBLISH_RECEIVE, "devices/+/status"),
                (PUBLISH_SEND, "devices/+/commands"),
                (PUBLISH_SEND, "devices/+/receipts"),
                (PUBLISH_SEND, CONTROL_TOPIC),
                (SUBSCRIBE_LITERAL, RESPONSE_TOPIC),
                (PUBLISH_RECEIVE, RESPONSE_TOPIC),
            ],
        ),
        OPERATOR_ROLE: _role(
            OPERATOR_ROLE,
            [
                (PUBLISH_SEND, "devices/+/commands"),
                (SUBSCRIBE_PATTERN, "devices/+/replies"),
                (PUBLISH_RECEIVE, "devices/+/replies"),
            ],
        ),
    }
    off = frozenset(suspended)
    clients = {g: Client(g, frozenset({GATEWAY_ROLE})) for g in gateways}
    clients.update({o: Client(o, frozenset({OPERATOR_ROLE})) for o in operators})
    for d in devices:
        base = f"devices/{d}"
        roles[device_role(d)] = _role(
            device_role(d),
            [
                (PUBLISH_SEND, f"{base}/telemetry"),
                (PUBLISH_SEND, f"{base}/status"),
                (PUBLISH_SEND, f"{base}/replies"),
                (SUBSCRIBE_LITERAL, f"{base}/commands"),
                (PUBLISH_RECEIVE, f"{base}/commands"),
                (SUBSCRIBE_LITERAL, f"{base}/receipts"),
                (PUBLISH_RECEIVE, f"{base}/receipts"),
            ],
        )
        if d not in off:
            clients[d] = Client(d, frozenset({device_role(d)}))
    return BrokerState(dict(DEFAULT_ACL_ACCESS), roles, clients)


def config_json(state: BrokerState) -> bytes:
    """The plugin's configuration file (``plugin_opt_config_file``) holding ``state``; stable for equal states.

    Args:
        state: the state.

    Returns:
        UTF-8 JSON.
    """
    doc = {
        "defaultACLAccess": dict(sorted(state.default_acl.items())),
        "roles": [{"rolename": r.name, "acls": r.acls_json()} for _, r in sorted(state.roles.items())],
        "clients": [
            {"username": c.username, "roles": [{"rolename": n} for n in sorted(c.roles)]}
            for _, c in sorted(state.clients.items())
        ],
        "groups": [],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


# -- planning ---------------------------------------------------------------------------------------------------


def plan(desired: BrokerState, actual: BrokerState) -> list[dict[str, Any]]:
    """The dynamic-security commands that turn ``actual`` into ``desired``.

    Order: clients to remove first (a revoked or suspended device is disconnected by the first request), then the
    default access, the roles, the clients to add, and the roles no one needs any more.

    Args:
        desired: the registry's state.
        actual: the broker's state (read completely).

    Returns:
        The commands (without correlation data); empty when the two are equal.
    """
    commands: list[dict[str, Any]] = []
    replaced = {n for n, c in actual.clients.items() if desired.clients.get(n) != c}
    commands += [{"command": "deleteClient", "username": n} for n in sorted(replaced)]
    if dict(actual.default_acl) != dict(desired.default_acl):
        acls = [{"acltype": t, "allow": a} for t, a in sorted(desired.default_acl.items())]
        commands.append({"command": "setDefaultACLAccess", "acls": acls})
    for name, role in sorted(desired.roles.items()):
        have = actual.roles.get(name)
        if have is None:
            commands.append({"command": "createRole", "rolename": name, "acls": role.acls_json()})
        elif have.acls != role.acls:
            # modifyRole replaces the entries in place, without disconnecting the role's clients.
            commands.append({"command": "modifyRole", "rolename": name, "acls": role.acls_json()})
    for name, client in sorted(desired.clients.items()):
        if name not in actual.clients or name in replaced:
            roles = [{"rolename": r} for r in sorted(client.roles)]
            commands.append({"command": "createClient", "username": name, "roles": roles})
    commands += [{"command": "deleteRole", "rolename": n} for n in sorted(actual.roles.keys() - desired.roles.keys())]
    return commands


def chunk_commands(
    commands: Sequence[dict[str, Any]],
    *,
    max_bytes: int = MAX_REQUEST_BYTES,
    max_commands: int = MAX_COMMANDS_PER_REQUEST,
) -> Iterator[list[dict[str, Any]]]:
    """Split commands into requests of at most ``max_commands`` and about ``max_bytes`` of JSON each.

    Args:
        commands: the commands, in order.
        max_bytes: the size a request should stay under (one command larger than it goes alone).
        max_commands: the most commands in one request.

    Yields:
        Lists of commands, in order.
    """
    chunk: list[dict[str, Any]] = []
    size = 0
    for c in commands:
        n = len(json.dumps(c, separators=(",", ":"))) + 64  # + the correlation data and a separator
        if chunk and (size + n > max_bytes or len(chunk) >= max_commands):
            yield chunk
            chunk, size = [], 0
        chunk.append(c)
        size += n
    if chunk:
        yield chunk


def check_results(commands: Sequence[dict[str, Any]], responses: Sequence[Response]) -> tuple[list[str], int]:
    """Judge the responses to applied commands.

    Args:
        commands: the commands sent.
        responses: their responses, in the same order.

    Returns:
        (failures: one line per failed command, conflicts: commands that found their work done by someone else).

    Raises:
        BrokerResponseError: a response answers a different command than the one sent.
    """
    failures: list[str] = []
    conflicts = 0
    for c, r in zip(commands, responses, strict=True):
        if r.command.lower() != str(c["command"]).lower():
            raise BrokerResponseError(f"response to {c['command']!r} names command {r.command[:80]!r}")
        if r.error is None:
            continue
        if (c["command"], r.error) in _BENIGN:
            conflicts += 1
            continue
        name = c.get("username") or c.get("rolename") or ""
        failures.append(f"{c['command']} {name}: {r.error[:200]}".replace("  ", " "))
    return failures, conflicts


# -- parsing what the broker sends ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """One response of the plugin to one of our commands.

    Attributes:
        command: the command it answers.
        correlation: our correlation data.
        error: the plugin's error text, None on success.
        data: the result object of a read command (checked further by the reader), None otherwise.
    """

    command: str
    correlation: str
    error: str | None
    data: Mapping[str, Any] | None


def _string(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING:
        raise BrokerResponseError(f"{what}: expected a string of at most {MAX_STRING} characters")
    return value


def _integer(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BrokerResponseError(f"{what}: expected an integer {low}..{high}")
    return value


def _list(value: object, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > limit:
        raise BrokerResponseError(f"{what}: expected a list of at most {limit} items")
    return value


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BrokerResponseError(f"{what}: expected an object")
    return value


def parse_responses(payload: bytes, token: str) -> list[Response]:
    """The responses to this process's commands in one message of the response topic.

    Args:
        payload: the message (untrusted).
        token: this process's correlation token; responses without it (another gateway's) are skipped.

    Returns:
        Our responses, in message order.

    Raises:
        BrokerResponseError: the message is too large, not JSON, or not shaped like the plugin's responses.
    """
    if len(payload) > MAX_RESPONSE_BYTES:
        raise BrokerResponseError(f"response message of {len(payload)} bytes, limit {MAX_RESPONSE_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:  # RecursionError: hostile nesting depth
        raise BrokerResponseError(f"response message is not JSON ({str(e)[:80]})") from e
    items = _list(_object(doc, "response message").get("responses"), "responses", MAX_RESPONSES)
    prefix = token + ":"
    out = []
    for i, item in enumerate(items):
        obj = _object(item, f"responses[{i}]")
        corr = obj.get("correlationData")
        if not isinstance(corr, str) or not corr.startswith(prefix):
            continue
        error = obj.get("error")
        data = obj.get("data")
        out.append(
            Response(
                command=_string(obj.get("command"), f"responses[{i}].command"),
                correlation=corr,
                error=None if error is None else _string(error, f"responses[{i}].error"),
                data=None if data is None else _object(data, f"responses[{i}].data"),
            )
        )
    return out


def _parse_default_acl(data: Mapping[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for i, item in enumerate(_list(data.get("acls"), "getDefaultACLAccess.acls", 16)):
        obj = _object(item, f"getDefaultACLAccess.acls[{i}]")
        acltype = _string(obj.get("acltype"), f"getDefaultACLAccess.acls[{i}].acltype")
        allow = obj.get("allow")
        if not isinstance(allow, bool):
            raise BrokerResponseError(f"getDefaultACLAccess.acls[{i}].allow: expected true or false")
        out[acltype] = allow
    return out


def _parse_role(item: object, where: str) -> Role:
    obj = _object(item, where)
    name = _string(obj.get("rolename"), f"{where}.rolename")
    acls = set()
    for j, a in enumerate(_list(obj.get("acls", []), f"{where}.acls", MAX_ACLS)):
        e = _object(a, f"{where}.acls[{j}]")
        allow = e.get("allow")
        if not isinstance(allow, bool):
            raise BrokerResponseError(f"{where}.acls[{j}].allow: expected true or false")
        acls.add(
            Acl(
                acltype=_string(e.get("acltype"), f"{where}.acls[{j}].acltype"),
                topic=_string(e.get("topic"), f"{where}.acls[{j}].topic"),
                allow=allow,
                priority=_integer(e.get("priority", 0), f"{where}.acls[{j}].priority", -(2**31), 2**31 - 1),
            )
        )
    return Role(name, frozenset(acls))


def _parse_client(item: object, where: str) -> Client:
    obj = _object(item, where)
    name = _string(obj.get("username"), f"{where}.username")
    roles = set()
    for j, r in enumerate(_list(obj.get("roles", []), f"{where}.roles", MAX_ACLS)):
        roles.add(_string(_object(r, f"{where}.roles[{j}]").get("rolename"), f"{where}.roles[{j}].rolename"))
    groups = _list(obj.get("groups", []), f"{where}.groups", MAX_ACLS)
    disabled = obj.get("disabled", False)
    if not isinstance(disabled, bool):
        raise BrokerResponseError(f"{where}.disabled: expected true or false")
    plain = not groups and obj.get("clientid") is None and not disabled
    return Client(name, frozenset(roles), plain)


class BrokerReader:
    """Reads the broker's whole dynamic-security state, a page at a time (sans-IO).

    Use: while ``requests()`` returns commands, send them and ``feed`` each response; then ``state()``.

    Args:
        page_size: roles or clients per page.
        max_entries: the most roles, or clients, accepted.
    """

    def __init__(self, *, page_size: int = PAGE_SIZE, max_entries: int = MAX_ENTRIES) -> None:
        self.page_size = page_size
        self.max_entries = max_entries
        self._default: dict[str, bool] | None = None
        self._roles: dict[str, Role] = {}
        self._clients: dict[str, Client] = {}
        self._offsets = {"listRoles": 0, "listClients": 0}
        self._done = {"listRoles": False, "listClients": False}

    def requests(self) -> list[dict[str, Any]]:
        """The commands of the next request; empty once everything is read."""
        out: list[dict[str, Any]] = []
        if self._default is None:
            out.append({"command": "getDefaultACLAccess"})
        for command in ("listRoles", "listClients"):
            if not self._done[command]:
                out.append(
                    {"command": command, "verbose": True, "count": self.page_size, "offset": self._offsets[command]}
                )
        return out

    def feed(self, command: Mapping[str, Any], response: Response) -> None:
        """Take the response to one command of ``requests()``.

        Raises:
            BrokerResponseError: the response is an error, malformed, or the broker holds more than the limit.
        """
        name = str(command["command"])
        if response.command != name:
            raise BrokerResponseError(f"response to {name} names command {response.command[:80]!r}")
        if response.error is not None:
            raise BrokerResponseError(f"{name} failed: {response.error[:200]}")
        data = _object(response.data, f"{name}.data")
        if name == "getDefaultACLAccess":
            self._default = _parse_default_acl(data)
            return
        key = "roles" if name == "listRoles" else "clients"
        total = _integer(data.get("totalCount"), f"{name}.totalCount", 0, 2**31 - 1)
        if total > self.max_entries:
            raise BrokerResponseError(f"the broker holds {total} {key}, more than the limit {self.max_entries}")
        items = _list(data.get(key), f"{name}.{key}", self.page_size)
        offset = self._offsets[name]
        for i, item in enumerate(items):
            where = f"{name}.{key}[{offset + i}]"
            if name == "listRoles":
                role = _parse_role(item, where)
                self._roles[role.name] = role
            else:
                client = _parse_client(item, where)
                self._clients[client.username] = client
        self._offsets[name] = offset + len(items)
        # A short page ends the listing; so does the total (entries added meanwhile are seen by the next sync).
        self._done[name] = len(items) < self.page_size or self._offsets[name] >= min(total, self.max_entries)

    def state(self) -> BrokerState:
        """The state read.

        Raises:
            RuntimeError: the reading is not finished.
        """
        if self._default is None or not all(self._done.values()):
            raise RuntimeError("the broker's state is not read completely")
        return BrokerState(self._default, dict(self._roles), dict(self._clients))


# -- the I/O glue ---------------------------------------------------------------------------------------------------


class BrokerSync:
    """Applies the registry to the broker over the gateway's connection: at every connect, whenever the registry
    changes (polled every ``interval_s``), and every ``resync_s`` in case someone changed the broker.

    Wiring (``edge.fleet.gateway``): give the transport ``route(on_incoming)`` and ``subscriptions``, then
    ``attach`` it; ``start`` and ``stop`` with the gateway.

    Args:
        desired: returns the registry's state (called on the sync thread).
        fingerprint: returns a value that changes when the registry changes (cheap: called every ``interval_s``).
        close: called on the sync thread when it ends (releases what ``desired`` opened).
        interval_s: seconds between registry polls.
        resync_s: seconds between full comparisons when nothing changed.
        timeout_s: seconds to wait for the broker's PUBACK and for each response.
    """

    subscriptions: Final = (RESPONSE_TOPIC,)

    def __init__(
        self,
        desired: Callable[[], BrokerState],
        fingerprint: Callable[[], object],
        *,
        close: Callable[[], None] | None = None,
        interval_s: float = 2.0,
        resync_s: float = 300.0,
        timeout_s: float = 10.0,
    ) -> None:
        self._desired = desired
        self._fingerprint = fingerprint
        self._close = close
        self.interval_s = interval_s
        self.resync_s = resync_s
        self.timeout_s = timeout_s
        self.token = os.urandom(8).hex()
        self._seq = 0
        self._transport: MqttTransport | None = None
        self._lock = threading.Lock()
        self._waiting: dict[str, Response | None] = {}
        self._answered = threading.Event()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._to_cut: set[str] = set()
        self._thread: threading.Thread | None = None
        self.syncs = 0  # completed syncs (tests wait on it)
        self.malformed = 0  # response messages that failed parsing
        self.last_error: str | None = None

    # -- wiring ---------------------------------------------------------------------------------------------------

    def route(self, inner: Callable[[Incoming], None]) -> Callable[[Incoming], None]:
        """Wrap the transport's message handler: responses of the plugin come here, everything else goes on."""

        def on_incoming(msg: Incoming) -> None:
            if msg.topic != RESPONSE_TOPIC:
                inner(msg)
                return
            try:
                self.on_response(msg.payload)
            finally:
                msg.ack()  # QoS 0 from the plugin: a no-op, but never leave a message unacknowledged

        return on_incoming

    def attach(self, transport: MqttTransport) -> None:
        """Use ``transport`` (subscribed to ``subscriptions``, its messages routed through ``route``)."""
        self._transport = transport

    def start(self) -> None:
        """Start the sync thread (it waits for the transport to connect)."""
        if self._thread is not None:
            raise RuntimeError("broker sync already started")
        self._thread = threading.Thread(target=self._run, name="broker-sync", daemon=True)
        self._thread.start()

    def kick(self, cut_off: Iterable[str] = ()) -> None:
        """Compare with the registry now, not at the next poll; first delete the clients ``cut_off`` names with one
        request (a suspension was just recorded: cutting the box off must not wait for reading the whole state)."""
        with self._lock:
            self._to_cut.update(cut_off)
        self._kick.set()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the sync thread (a request in flight is abandoned: the next sync repeats it)."""
        self._stop.set()
        self._kick.set()
        self._answered.set()
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._close is not None:
            self._close()

    # -- one sync -------------------------------------------------------------------------------------------------

    def sync_once(self) -> Counter[str]:
        """Read the broker's state, compare it with the registry's, apply the difference.

        Returns:
            The commands applied, counted by name (empty when the broker was up to date).

        Raises:
            BrokerSyncError: the broker refused a request, did not answer, or a command failed.
            BrokerResponseError: a response was malformed.
            ConfigError, StoreError: the registry cannot be read.
        """
        applied: Counter[str] = Counter()
        for _ in range(_PASSES):
            actual = self._read()
            desired = self._desired()
            boxes = sum(n.startswith(DEVICE_ROLE_PREFIX) for n in actual.roles)
            if desired.registered == 0 and boxes:
                # A registry that never enrolled anyone, against a broker that serves boxes: this gateway reads the
                # wrong database. Applying it would delete every box from the broker and stop the fleet.
                raise BrokerSyncError(
                    f"the registry names no device at all, but the broker has {boxes}: is [gateway] store this "
                    "fleet's database? Nothing was changed; to empty the broker deliberately, restart it after "
                    "`edge fleet broker-config`"
                )
            commands = plan(desired, actual)
            if not commands:
                return applied
            responses = self._exchange(commands)
            failures, conflicts = check_results(commands, responses)
            if failures:
                raise BrokerSyncError(f"the broker refused {len(failures)} change(s): {'; '.join(failures[:5])}")
            applied.update(str(c["command"]) for c in commands)
            if not conflicts:
                return applied
        raise BrokerSyncError(f"the broker's state still differs after {_PASSES} passes (changed concurrently?)")

    def _read(self) -> BrokerState:
        reader = BrokerReader()
        for _ in range(2 + 2 * math.ceil(MAX_ENTRIES / PAGE_SIZE)):  # bounded even if the broker never ends a list
            commands = reader.requests()
            if not commands:
                return reader.state()
            for c, r in zip(commands, self._exchange(commands), strict=True):
                reader.feed(c, r)
        raise BrokerResponseError("the broker's lists did not end")

    def _exchange(self, commands: Sequence[dict[str, Any]]) -> list[Response]:
        transport = self._transport
        if transport is None:
            raise RuntimeError("broker sync has no transport (attach it first)")
        out: list[Response] = []
        for chunk in chunk_commands(commands):
            ids = []
            for _ in chunk:
                self._seq += 1
                ids.append(f"{self.token}:{self._seq}")
            body = {"commands": [{**c, "correlationData": i} for c, i in zip(chunk, ids, strict=True)]}
            with self._lock:
                self._waiting = dict.fromkeys(ids)
                self._answered.clear()
            try:
                delivery = transport.publish(CONTROL_TOPIC, json.dumps(body, separators=(",", ":")).encode())
                if not delivery.wait(self.timeout_s):
                    raise BrokerSyncError(f"no PUBACK for {CONTROL_TOPIC} within {self.timeout_s:g} s")
                if delivery.error is not None:
                    raise BrokerSyncError(f"{CONTROL_TOPIC} not delivered: {delivery.error}")
                if not delivery.ok:
                    raise BrokerSyncError(
                        f"the broker refused {CONTROL_TOPIC} ({delivery.reason}): this gateway's identity needs the "
                        "gateway role of the dynamic-security plugin, i.e. a broker running the fragment `edge fleet "
                        "broker-config` writes, and an identity from `edge fleet ca issue-client NAME` that a running "
                        "gateway or a broker restart has applied"
                    )
                self._answered.wait(self.timeout_s)
                with self._lock:
                    got = [self._waiting[i] for i in ids]
            finally:
                with self._lock:
                    self._waiting = {}
            if self._stop.is_set():
                raise BrokerSyncError("the gateway is stopping")
            answered = [r for r in got if r is not None]
            if len(answered) != len(ids):
                raise BrokerSyncError(
                    f"{len(ids) - len(answered)} of {len(ids)} responses missing on {RESPONSE_TOPIC} after "
                    f"{self.timeout_s:g} s: is the broker's dynamic-security plugin loaded (the `plugin` line of "
                    "broker/edge-fleet.conf)?"
                )
            out += answered
        return out

    def on_response(self, payload: bytes) -> None:
        """Take one message of the response topic (called on the transport's network thread)."""
        try:
            responses = parse_responses(payload, self.token)
        except BrokerResponseError as e:
            self.malformed += 1
            event(log, logging.WARNING, "malformed dynamic-security response ignored", error=str(e))
            return
        with self._lock:
            for r in responses:
                if r.correlation in self._waiting and self._waiting[r.correlation] is None:
                    self._waiting[r.correlation] = r
            if self._waiting and all(v is not None for v in self._waiting.values()):
                self._answered.set()

    def _cut_off_now(self) -> None:
        with self._lock:
            names, self._to_cut = sorted(self._to_cut), set()
        if not names:
            return
        try:
            commands = [{"command": "deleteClient", "username": n} for n in names]
            failures, _conflicts = check_results(commands, self._exchange(commands))
        except Exception as e:  # the full sync that follows applies the same state; say why this one failed
            event(log, logging.WARNING, "suspended clients not cut off at once", error=str(e)[:300])
            return
        if failures:
            event(log, logging.WARNING, "suspended clients not cut off at once", error="; ".join(failures[:5]))
        else:
            event(log, logging.INFO, "suspended clients cut off", clients=names)

    # -- the thread -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        synced: tuple[int, object] | None = None  # (transport.connects, fingerprint) of the last good sync
        synced_at = 0.0
        failures = 0
        retry_at = 0.0
        stamp: object = None
        stamped_at = -math.inf
        try:
            while not self._stop.is_set():
                kicked = self._kick.wait(0.25)
                self._kick.clear()
                if self._stop.is_set():
                    break
                transport = self._transport
                if transport is None or not transport.connected:
                    continue
                if kicked:
                    self._cut_off_now()
                now = time.monotonic()
                if kicked or now - stamped_at >= self.interval_s:
                    stamp, stamped_at = self._fingerprint(), now
                key = (transport.connects, stamp)
                if (key == synced and now - synced_at < self.resync_s) or now < retry_at:
                    continue
                try:
                    applied = self.sync_once()
                except Exception as e:  # every failure is logged and retried: the thread must live
                    failures += 1
                    delay = min(60.0, self.interval_s * 2**failures)
                    retry_at = now + delay
                    self.last_error = str(e)
                    if isinstance(e, EdgeError | OSError):
                        event(log, logging.WARNING, "broker access rules not applied", error=str(e), retry_s=delay)
                    else:
                        log.exception("broker sync failed unexpectedly; retrying in %.0f s", delay)
                    continue
                failures, synced, synced_at, self.last_error = 0, key, now, None
                self.syncs += 1
                if applied:
                    event(log, logging.INFO, "broker access rules applied", **dict(sorted(applied.items())))
        finally:
            if self._close is not None:
                try:
                    self._close()
                except EdgeError as e:
                    event(log, logging.WARNING, "closing the broker sync's store failed", error=str(e))
