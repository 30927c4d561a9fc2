"""Settings, read once from the environment (``CORRAL_*``)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.domain.pricing import DEFAULT_PRICES, Prices, parse_prices


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if os.geteuid() == 0:
        return Path("/var/lib/corral")
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "corral"


def _int(env: dict[str, str], name: str, default: int) -> int:
    """A positive integer setting."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1, got {value}")
    return value


def _int0(env: dict[str, str], name: str, default: int) -> int:
    """A non-negative integer setting."""
    raw = (env.get(name) or "").strip()
    if raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise SystemExit(f"{name} must be a non-negative integer, got {raw!r}")
    return int(raw)


def _port(env: dict[str, str], name: str, default: int) -> int:
    value = _int0(env, name, default)
    if value > 65535:
        raise SystemExit(f"{name} must be a port number (0-65535), got {value}")
    return value


DEFAULT_EGRESS_DENY = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")


def _cidrs(env: dict[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if name not in env:
        return default
    out: list[str] = []
    for item in env[name].replace(",", " ").split():
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise SystemExit(f"{name}: {item!r} is not a network") from None
    return tuple(out)


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"{name} must be on or off, got {raw!r}")


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(name) or default
    if raw not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    """A positive number of seconds (fractions allowed)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 86400:
        raise SystemExit(f"{name} must be more than 0 and at most 86400 seconds, got {raw!r}")
    return value


def _optional(env: dict[str, str], name: str, parse: Callable[[dict[str, str], str, int], int]) -> int | None:
    """An integer setting with no default (None when unset: the value is worked out at run time)."""
    return parse(env, name, 0) if (env.get(name) or "").strip() else None


def _ratio(env: dict[str, str], name: str, default: float) -> float:
    """An overcommit ratio: a number from 0.1 to 100."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from None
    if not 0.1 <= value <= 100:
        raise SystemExit(f"{name} must be between 0.1 and 100, got {raw!r}")
    return value


def _prices(env: dict[str, str]) -> Prices:
    raw = (env.get("CORRAL_PRICES") or "").strip()
    if not raw:
        return DEFAULT_PRICES
    try:
        return parse_prices(raw)
    except ValueError as exc:
        raise SystemExit(f"CORRAL_PRICES: {exc}") from None


def prepare_data_dir(path: Path) -> None:
    """Create the server's data directory, 0711: others may pass through it (a sandbox's root user must reach
    its root filesystem under ``node/``) but not list it; the database and the secret key in it are 0600."""
    path.mkdir(mode=0o711, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o711 and path.stat().st_uid == os.geteuid():
        path.chmod(0o711)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    secret_key_file: Path
    public_url: str | None = None  # base URL users reach the API at (device-login links); else the request's
    rate_limit_per_minute: int = 600  # per API key
    rate_limit_burst: int = 100
    anon_rate_limit_per_minute: int = 60  # per client address, for the endpoints without auth
    anon_rate_limit_burst: int = 20
    # proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks); none by default:
    # the client is the socket's peer (rate limits, logs)
    trusted_proxies: tuple[str, ...] = ()
    # password logins (/activate, password change): more than this many wrong tries for one account within
    # login_lockout_s lock it for login_lockout_s
    login_max_failures: int = 5
    login_lockout_s: int = 900
    max_body_bytes: int = 1024 * 1024
    device_code_ttl_seconds: int = 900
    node: bool = True  # run sandboxes on this host (CORRAL_NODE=off: the API only, VM calls answer 503)
    runtime: str = "crun"  # crun or runc
    images_dir: Path | None = None  # default: <data_dir>/images
    sandbox_id_base: int = 100000  # host uid/gid of root inside every sandbox (65536 ids from there)
    warm_pool_size: int = 2  # booted sandboxes waiting per default image
    # node capacity (docs/operations.md "Capacity"): the sparse btrfs file that holds every sandbox disk
    # (None: the data dir's free space less the reserve) and what is left to the host; the parent memory
    # cgroup's limit (None: the host's memory less the reserve); the overcommit ratios create is admitted by
    disk_pool_gib: int | None = None
    disk_reserve_mib: int | None = None  # None: 5% of the filesystem, at least 1 GiB
    node_mem_mib: int | None = None
    mem_reserve_mib: int | None = None  # None: 10% of the host's memory, at least 1 GiB
    disk_watch_s: float = 10.0  # how often the pool's limit follows the data dir's free space
    overcommit_vcpus: float = 16.0
    overcommit_mem: float = 2.0
    overcommit_disk: float = 4.0
    # per-account quotas over the account's VMs that are not destroyed (docs/operations.md "Quotas")
    quota_vms: int = 20
    quota_vcpus: int = 32
    quota_mem_mib: int = 65536
    quota_disk_mib: int = 262144
    # who may read GET /v1/node: these e-mail addresses; none set: the first user who signed up
    operator_emails: tuple[str, ...] = ()
    max_vcpus: int = max(1, os.cpu_count() or 1)
    max_mem_mib: int = 8192
    max_disk_mib: int = 65536
    max_concurrent_requests: int = 512  # worker threads for blocking requests (execs, file transfers)
    # bulkheads (docs/operations.md "Limits"): commands running at once (exec and exec/stream) per API key, per
    # VM and on the server; interactive sessions (terminals, shells, SSH sessions) per key (per account for
    # SSH) and per VM; SSH connections not yet logged in, per source address and in total
    max_execs_per_key: int = 32
    max_execs_per_vm: int = 16
    max_execs: int = 1024
    max_execs_per_user: int = 64
    max_sessions_per_key: int = 32
    max_sessions_per_vm: int = 16
    ssh_preauth_per_source: int = 32
    ssh_preauth_max: int = 512
    ssh_login_timeout_s: float = 30.0
    # file transfers (docs/operations.md "Limits"): uploads, downloads and listings at once, each per API key and
    # per VM; seconds an upload's body may send nothing; seconds a file worker may take for one operation
    max_file_ops_per_key: int = 16
    max_file_ops_per_vm: int = 8
    max_file_ops_per_user: int = 32
    upload_idle_timeout_s: float = 30.0
    file_op_timeout_s: float = 30.0
    # each upload_idle_timeout_s window of a body must bring this much a second
    upload_min_rate_bps: int = 4096
    download_send_timeout_s: float = 60.0  # a download whose client reads nothing for this long is ended
    sandbox_init: str | None = None  # pid 1 of sandboxes: corral-init (default) or e.g. /usr/bin/catatonit
    # the sandbox network (docs/operations.md): off = sandboxes get no network at all
    network: bool = True
    gateway_netns: str = "corral-gw"  # the namespace that holds the egress proxy, the resolver and the rules
    sandbox_subnet: str = "10.88.0.0/16"
    uplink: str = "host"  # "host" (masqueraded through the host) or "netns:NAME"
    uplink_subnet: str = "100.127.88.0/30"
    upstream_dns: tuple[str, ...] = ()  # default: the host's non-loopback name servers
    upstream_ca: Path | None = None  # extra CA bundle the proxy trusts for upstream TLS when it intercepts
    # never reachable from sandboxes, whatever a policy says (the operator's own networks); "" for none
    egress_deny_cidrs: tuple[str, ...] = DEFAULT_EGRESS_DENY
    egress_proxy_port: int = 15001
    egress_dns_port: int = 15053
    # egress limits (docs/operations.md): open connections per VM, per owner and in all (the proxy's descriptor
    # limit is sized from them), seconds a connection may stay silent or undecided, and the watchdog's probe
    egress_max_conns_per_vm: int = 1024
    egress_max_conns_per_owner: int = 4096
    egress_max_conns: int = 16384
    egress_first_byte_timeout_s: float = 30.0
    egress_probe_interval_s: float = 1.0
    egress_probe_timeout_s: float = 2.0
    # where `make install` builds CRIU and crun with libcriu (scripts/build-state-tools); used when present
    tools_prefix: Path = Path("/opt/corral")
    snapshots_dir: Path | None = None  # the local snapshot store; default: <data_dir>/snapshots
    # accounting (docs/operations.md): how often running VMs' cgroups are sampled, and the price table
    usage_interval_s: float = 30.0
    prices: Prices = DEFAULT_PRICES
    # the SSH gateway (docs/operations.md): listen address and port (0: any free port), and the host name
    # `GET /v1/vms/{id}/ssh` tells users to connect to (default: the host name the API was reached at)
    ssh: bool = True
    ssh_listen: str = "127.0.0.1"
    ssh_port: int = 2222
    ssh_public_host: str | None = None
    # the guest proxy's own origin (docs/api.md "Guest ports in a browser"): `corral serve` listens on
    # proxy_port (0: any free port) beside the API; a VM's port is http://<port>-<vm id>.<proxy_domain>:<port>
    proxy_domain: str = "localhost"
    proxy_port: int = 8001
    proxy_scheme: str = "http"  # what browsers use (https behind a TLS terminator)
    proxy_public_port: int | None = None  # the port browsers use, when not proxy_port (e.g. 443)
    proxy_session_ttl_s: float = 3600.0  # seconds a proxy origin's session cookie lasts

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = Path(env.get("CORRAL_DATA_DIR") or default_data_dir(env))
        url = env.get("CORRAL_DATABASE_URL") or f"sqlite:///{data_dir / 'corral.db'}"
        return cls(
            data_dir=data_dir,
            database_url=url,
            secret_key_file=Path(env.get("CORRAL_SECRET_KEY_FILE") or data_dir / "secret.key"),
            public_url=(env.get("CORRAL_PUBLIC_URL") or None),
            rate_limit_per_minute=_int(env, "CORRAL_RATE_LIMIT_PER_MINUTE", 600),
            rate_limit_burst=_int(env, "CORRAL_RATE_LIMIT_BURST", 100),
            anon_rate_limit_per_minute=_int(env, "CORRAL_ANON_RATE_LIMIT_PER_MINUTE", 60),
            anon_rate_limit_burst=_int(env, "CORRAL_ANON_RATE_LIMIT_BURST", 20),
            trusted_proxies=_cidrs(env, "CORRAL_TRUSTED_PROXIES", ()),
            login_max_failures=_int(env, "CORRAL_LOGIN_MAX_FAILURES", 5),
            login_lockout_s=_int(env, "CORRAL_LOGIN_LOCKOUT_S", 900),
            max_body_bytes=_int(env, "CORRAL_MAX_BODY_BYTES", 1024 * 1024),
            device_code_ttl_seconds=_int(env, "CORRAL_DEVICE_CODE_TTL", 900),
            node=_flag(env, "CORRAL_NODE", True),
            runtime=_choice(env, "CORRAL_RUNTIME", ("crun", "runc"), "crun"),
            images_dir=Path(env["CORRAL_IMAGES_DIR"]) if env.get("CORRAL_IMAGES_DIR") else None,
            sandbox_id_base=_int(env, "CORRAL_SANDBOX_ID_BASE", 100000),
            warm_pool_size=_int0(env, "CORRAL_WARM_POOL_SIZE", 2),
            disk_pool_gib=_optional(env, "CORRAL_DISK_POOL_GIB", _int),
            disk_reserve_mib=_optional(env, "CORRAL_DISK_RESERVE_MIB", _int0),
            node_mem_mib=_optional(env, "CORRAL_NODE_MEM_MIB", _int),
            mem_reserve_mib=_optional(env, "CORRAL_MEM_RESERVE_MIB", _int0),
            disk_watch_s=_seconds(env, "CORRAL_DISK_WATCH_S", 10.0),
            overcommit_vcpus=_ratio(env, "CORRAL_OVERCOMMIT_VCPUS", 16.0),
            overcommit_mem=_ratio(env, "CORRAL_OVERCOMMIT_MEM", 2.0),
            overcommit_disk=_ratio(env, "CORRAL_OVERCOMMIT_DISK", 4.0),
            quota_vms=_int(env, "CORRAL_QUOTA_VMS", 20),
            quota_vcpus=_int(env, "CORRAL_QUOTA_VCPUS", 32),
            quota_mem_mib=_int(env, "CORRAL_QUOTA_MEM_MIB", 65536),
            quota_disk_mib=_int(env, "CORRAL_QUOTA_DISK_MIB", 262144),
            operator_emails=tuple(
                x.strip().lower() for x in (env.get("CORRAL_OPERATOR_EMAILS") or "").replace(",", " ").split()
            ),
            max_vcpus=_int(env, "CORRAL_MAX_VCPUS", max(1, os.cpu_count() or 1)),
            max_mem_mib=_int(env, "CORRAL_MAX_MEM_MIB", 8192),
            max_disk_mib=_int(env, "CORRAL_MAX_DISK_MIB", 65536),
            max_concurrent_requests=_int(env, "CORRAL_MAX_CONCURRENT_REQUESTS", 512),
            max_execs_per_key=_int(env, "CORRAL_MAX_EXECS_PER_KEY", 32),
            max_execs_per_vm=_int(env, "CORRAL_MAX_EXECS_PER_VM", 16),
            max_execs=_int(env, "CORRAL_MAX_EXECS", 1024),
            max_execs_per_user=_int(env, "CORRAL_MAX_EXECS_PER_USER", 64),
            max_sessions_per_key=_int(env, "CORRAL_MAX_SESSIONS_PER_KEY", 32),
            max_sessions_per_vm=_int(env, "CORRAL_MAX_SESSIONS_PER_VM", 16),
            ssh_preauth_per_source=_int(env, "CORRAL_SSH_PREAUTH_PER_SOURCE", 32),
            ssh_preauth_max=_int(env, "CORRAL_SSH_PREAUTH_MAX", 512),
            ssh_login_timeout_s=_seconds(env, "CORRAL_SSH_LOGIN_TIMEOUT_S", 30.0),
            max_file_ops_per_key=_int(env, "CORRAL_MAX_FILE_OPS_PER_KEY", 16),
            max_file_ops_per_vm=_int(env, "CORRAL_MAX_FILE_OPS_PER_VM", 8),
            max_file_ops_per_user=_int(env, "CORRAL_MAX_FILE_OPS_PER_USER", 32),
            upload_idle_timeout_s=_seconds(env, "CORRAL_UPLOAD_IDLE_TIMEOUT_S", 30.0),
            file_op_timeout_s=_seconds(env, "CORRAL_FILE_OP_TIMEOUT_S", 30.0),
            upload_min_rate_bps=_int0(env, "CORRAL_UPLOAD_MIN_RATE_BPS", 4096),
            download_send_timeout_s=_seconds(env, "CORRAL_DOWNLOAD_SEND_TIMEOUT_S", 60.0),
            sandbox_init=env.get("CORRAL_SANDBOX_INIT") or None,
            network=_flag(env, "CORRAL_NETWORK", True),
            gateway_netns=env.get("CORRAL_GATEWAY_NETNS") or "corral-gw",
            sandbox_subnet=env.get("CORRAL_SANDBOX_SUBNET") or "10.88.0.0/16",
            uplink=env.get("CORRAL_UPLINK") or "host",
            uplink_subnet=env.get("CORRAL_UPLINK_SUBNET") or "100.127.88.0/30",
            upstream_dns=tuple(
                x for x in (env.get("CORRAL_UPSTREAM_DNS") or "").replace(",", " ").split() if x
            ),
            upstream_ca=Path(env["CORRAL_UPSTREAM_CA"]) if env.get("CORRAL_UPSTREAM_CA") else None,
            egress_deny_cidrs=_cidrs(env, "CORRAL_EGRESS_DENY_CIDRS", DEFAULT_EGRESS_DENY),
            egress_proxy_port=_int(env, "CORRAL_EGRESS_PROXY_PORT", 15001),
            egress_dns_port=_int(env, "CORRAL_EGRESS_DNS_PORT", 15053),
            egress_max_conns_per_vm=_int(env, "CORRAL_EGRESS_MAX_CONNS_PER_VM", 1024),
            egress_max_conns_per_owner=_int(env, "CORRAL_EGRESS_MAX_CONNS_PER_OWNER", 4096),
            egress_max_conns=_int(env, "CORRAL_EGRESS_MAX_CONNS", 16384),
            egress_first_byte_timeout_s=_seconds(env, "CORRAL_EGRESS_FIRST_BYTE_TIMEOUT_S", 30.0),
            egress_probe_interval_s=_seconds(env, "CORRAL_EGRESS_PROBE_INTERVAL_S", 1.0),
            egress_probe_timeout_s=_seconds(env, "CORRAL_EGRESS_PROBE_TIMEOUT_S", 2.0),
            tools_prefix=Path(env.get("CORRAL_TOOLS_PREFIX") or "/opt/corral"),
            snapshots_dir=Path(env["CORRAL_SNAPSHOTS_DIR"]) if env.get("CORRAL_SNAPSHOTS_DIR") else None,
            usage_interval_s=_seconds(env, "CORRAL_USAGE_INTERVAL_S", 30.0),
            prices=_prices(env),
            ssh=_flag(env, "CORRAL_SSH", True),
            ssh_listen=env.get("CORRAL_SSH_LISTEN") or "127.0.0.1",
            ssh_port=_port(env, "CORRAL_SSH_PORT", 2222),
            ssh_public_host=env.get("CORRAL_SSH_HOST") or None,
            proxy_domain=(env.get("CORRAL_PROXY_DOMAIN") or "localhost").strip(".").lower(),
            proxy_port=_port(env, "CORRAL_PROXY_PORT", 8001),
            proxy_scheme=_choice(env, "CORRAL_PROXY_SCHEME", ("http", "https"), "http"),
            proxy_public_port=_port(env, "CORRAL_PROXY_PUBLIC_PORT", 0) or None,
            proxy_session_ttl_s=float(_int(env, "CORRAL_PROXY_SESSION_TTL", 3600)),
        )

    @property
    def egress_dir(self) -> Path:
        """The egress proxy's CA and state."""
        return self.data_dir / "egress"

    @property
    def snapshots_path(self) -> Path:
        return self.snapshots_dir or self.data_dir / "snapshots"

    @property
    def images_path(self) -> Path:
        return self.images_dir or self.data_dir / "images"
