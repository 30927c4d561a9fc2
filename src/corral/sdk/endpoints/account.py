"""The account's own resources: users, device login, environment variables, secrets, egress policy and
rules, the egress audit, usage, images and the health probes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from corral.sdk.call import UNSET, Call, Route, Unset, body, data, model, nothing, page, params
from corral.sdk.models import (
    ApiKey,
    ApiKeyInfo,
    DeviceApproval,
    DeviceCode,
    DevicePoll,
    EgressEvent,
    EgressPolicy,
    EgressRule,
    EnvVar,
    Health,
    Image,
    Page,
    PasswordChange,
    Secret,
    Signup,
    Usage,
    User,
)

# ---- health --------------------------------------------------------------------------------------------

HEALTHZ = Route("GET", "/healthz")
READYZ = Route("GET", "/readyz")


def health() -> Call[Health]:
    """Liveness: the server answers (``status: ok``)."""
    return Call(HEALTHZ, model(Health), auth=False)


def ready() -> Call[Health]:
    """Readiness: its database answers (``status: ready``); 503 ``not_ready`` otherwise."""
    return Call(READYZ, model(Health), auth=False)


# ---- users and device login ----------------------------------------------------------------------------

CREATE_USER = Route("POST", "/v1/users")
ME = Route("GET", "/v1/users/me")
DEVICE_CODE = Route("POST", "/v1/auth/device/code")
DEVICE_POLL = Route("GET", "/v1/auth/device/poll")
DEVICE_APPROVE = Route("POST", "/v1/auth/device/approve")


def create_user(*, first_name: str, last_name: str, email: str, password: str) -> Call[Signup]:
    """Sign up (no API key needed): the answer holds the user and an API key whose token is shown once."""
    json = body(first_name=first_name, last_name=last_name, email=email, password=password)
    return Call(CREATE_USER, model(Signup), json=json, auth=False)


def me() -> Call[User]:
    """The user the API key belongs to."""
    return Call(ME, model(User))


def device_code() -> Call[DeviceCode]:
    """Start a device-code login (no API key needed)."""
    return Call(DEVICE_CODE, data(DeviceCode), auth=False)


def device_poll(code: str) -> Call[DevicePoll]:
    """Poll a device code: ``pending``, ``authorized`` (with ``token``, once) or ``expired``."""
    return Call(DEVICE_POLL, data(DevicePoll), params=params(code=code), auth=False)


def device_approve(code: str) -> Call[DeviceApproval]:
    """Approve a device code as this key's user: the device's next poll gets a new key."""
    return Call(DEVICE_APPROVE, data(DeviceApproval), json=body(code=code))


# ---- API keys and the password -------------------------------------------------------------------------

LIST_API_KEYS = Route("GET", "/v1/api-keys")
CREATE_API_KEY = Route("POST", "/v1/api-keys")
REVOKE_API_KEY = Route("DELETE", "/v1/api-keys/{key_id}")
CHANGE_PASSWORD = Route("POST", "/v1/users/me/password")


def list_api_keys(*, limit: int | None = None, cursor: str | None = None) -> Call[Page[ApiKeyInfo]]:
    """The account's keys that are not revoked, newest first, with their last use (never their tokens)."""
    return Call(LIST_API_KEYS, page(ApiKeyInfo), params=params(limit=limit, cursor=cursor))


def create_api_key(name: str) -> Call[ApiKey]:
    """A new key for the account; its ``token`` is shown once."""
    return Call(CREATE_API_KEY, model(ApiKey), json=body(name=name))


def revoke_api_key(key_id: str) -> Call[None]:
    """Revoke a key at once: the next request with it answers 401 (this client's own key too)."""
    return Call(REVOKE_API_KEY, nothing, path_values={"key_id": key_id})


def change_password(*, current_password: str, new_password: str) -> Call[PasswordChange]:
    """Change the account's password; every other key of the account is revoked (this client's stays)."""
    json = body(current_password=current_password, new_password=new_password)
    return Call(CHANGE_PASSWORD, model(PasswordChange), json=json)


# ---- environment variables -----------------------------------------------------------------------------

LIST_ENV = Route("GET", "/v1/env")
GET_ENV = Route("GET", "/v1/env/{key}")
PUT_ENV = Route("PUT", "/v1/env/{key}")
DELETE_ENV = Route("DELETE", "/v1/env/{key}")


def list_env(*, limit: int | None = None, cursor: str | None = None) -> Call[Page[EnvVar]]:
    return Call(LIST_ENV, page(EnvVar), params=params(limit=limit, cursor=cursor))


def get_env(key: str) -> Call[EnvVar]:
    return Call(GET_ENV, model(EnvVar), path_values={"key": key})


def set_env(key: str, value: str) -> Call[EnvVar]:
    """Create the variable or replace its value; every command in your VMs sees it."""
    return Call(PUT_ENV, model(EnvVar), path_values={"key": key}, json={"value": value})


def delete_env(key: str) -> Call[None]:
    return Call(DELETE_ENV, nothing, path_values={"key": key})


# ---- secrets -------------------------------------------------------------------------------------------

CREATE_SECRET = Route("POST", "/v1/secrets")
LIST_SECRETS = Route("GET", "/v1/secrets")
GET_SECRET = Route("GET", "/v1/secrets/{secret_id}")
UPDATE_SECRET = Route("PATCH", "/v1/secrets/{secret_id}")
DELETE_SECRET = Route("DELETE", "/v1/secrets/{secret_id}")


def create_secret(
    *,
    name: str,
    secret: str,
    env_var: str,
    hosts: Sequence[str] | None = None,
    comment: str | None = None,
) -> Call[Secret]:
    """Store a secret (never returned). Sandboxes see ``env_var`` = ``proxy_value``; the egress proxy puts
    the real value in HTTPS request headers to ``hosts`` (default all)."""
    json = body(
        name=name,
        secret=secret,
        env_var=env_var,
        hosts=list(hosts) if hosts is not None else None,
        comment=comment,
    )
    return Call(CREATE_SECRET, model(Secret), json=json)


def list_secrets(
    *,
    name: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    sort: str | None = None,
    order: str | None = None,
) -> Call[Page[Secret]]:
    q = params(name=name, limit=limit, cursor=cursor, sort=sort, order=order)
    return Call(LIST_SECRETS, page(Secret), params=q)


def get_secret(secret_id: str) -> Call[Secret]:
    return Call(GET_SECRET, model(Secret), path_values={"secret_id": secret_id})


def update_secret(
    secret_id: str,
    *,
    secret: str | None = None,
    env_var: str | None = None,
    hosts: Sequence[str] | None = None,
    comment: str | Unset | None = UNSET,
) -> Call[Secret]:
    """Change only what is given; ``comment=None`` clears the comment. The name cannot change."""
    json = body(secret=secret, env_var=env_var, hosts=list(hosts) if hosts is not None else None)
    if not isinstance(comment, Unset):
        json["comment"] = comment
    return Call(UPDATE_SECRET, model(Secret), path_values={"secret_id": secret_id}, json=json)


def delete_secret(secret_id: str) -> Call[None]:
    return Call(DELETE_SECRET, nothing, path_values={"secret_id": secret_id})


# ---- egress --------------------------------------------------------------------------------------------

GET_POLICY = Route("GET", "/v1/egress/policy")
PUT_POLICY = Route("PUT", "/v1/egress/policy")
LIST_RULES = Route("GET", "/v1/egress/rules")
CREATE_RULE = Route("POST", "/v1/egress/rules")
GET_RULE = Route("GET", "/v1/egress/rules/{rule_id}")
DELETE_RULE = Route("DELETE", "/v1/egress/rules/{rule_id}")


def get_policy() -> Call[EgressPolicy]:
    return Call(GET_POLICY, model(EgressPolicy))


def set_policy(mode: str) -> Call[EgressPolicy]:
    """``enforce`` (only allowlisted destinations) or ``warn`` (everything, audited)."""
    return Call(PUT_POLICY, model(EgressPolicy), json={"mode": mode})


def list_rules(
    *,
    host: str | None = None,
    cidr: str | None = None,
    name: str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    sort: str | None = None,
    order: str | None = None,
) -> Call[Page[EgressRule]]:
    q = params(host=host, cidr=cidr, name=name, limit=limit, cursor=cursor, sort=sort, order=order)
    return Call(LIST_RULES, page(EgressRule), params=q)


def create_rule(
    *,
    host: str | None = None,
    cidr: str | None = None,
    name: str | None = None,
    comment: str | None = None,
) -> Call[EgressRule]:
    """Allow ``host`` (exact or ``*.example.org``) or ``cidr``: give one of them."""
    return Call(CREATE_RULE, model(EgressRule), json=body(name=name, host=host, cidr=cidr, comment=comment))


def get_rule(rule_id: str) -> Call[EgressRule]:
    return Call(GET_RULE, model(EgressRule), path_values={"rule_id": rule_id})


def delete_rule(rule_id: str) -> Call[None]:
    return Call(DELETE_RULE, nothing, path_values={"rule_id": rule_id})


# ---- audit and usage -----------------------------------------------------------------------------------

AUDIT_EGRESS = Route("GET", "/v1/audit/egress")
USAGE = Route("GET", "/v1/usage")


def _stamp(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def list_egress_events(
    *,
    vm_id: str | None = None,
    verdict: str | None = None,
    allowed: bool | None = None,
    mode: str | None = None,
    host: str | None = None,
    cidr: str | None = None,
    protocol: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    order: str | None = None,
) -> Call[Page[EgressEvent]]:
    """Egress audit events, newest first by default; ``since``/``until`` are exclusive (naive: UTC)."""
    q = params(
        vm_id=vm_id,
        verdict=verdict,
        allowed=allowed,
        mode=mode,
        host=host,
        cidr=cidr,
        protocol=protocol,
        since=_stamp(since),
        until=_stamp(until),
        limit=limit,
        cursor=cursor,
        order=order,
    )
    return Call(AUDIT_EGRESS, page(EgressEvent), params=q)


def usage(*, from_: str | None = None, to: str | None = None, vm_id: str | None = None) -> Call[Usage]:
    """Usage and cost per UTC day and VM, ``from_`` to ``to`` inclusive (``YYYY-MM-DD``)."""
    return Call(USAGE, model(Usage), params=params(from_=from_, to=to, vm_id=vm_id))


# ---- images --------------------------------------------------------------------------------------------

LIST_IMAGES = Route("GET", "/v1/images")


def list_images() -> Call[Page[Image]]:
    """The images on the server's node."""
    return Call(LIST_IMAGES, page(Image))
