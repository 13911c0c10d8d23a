"""Run Debian's strongSwan charon in a network namespace, driven by swanctl.

Used by the interop tests, the lab's customer sites and the benchmarks.

How one charon is isolated (several run side by side on one host):

* its own network namespace (:mod:`deploy.netns`);
* its own ``strongswan.conf`` via ``STRONGSWAN_CONF`` (no ``/etc/strongswan.d``
  includes: the plugin list is explicit, see :data:`PLUGINS`);
* its own vici socket, a unix socket in its work directory, which is
  reachable from any namespace (unix sockets live in the file system);
* a private ``/run``: charon's pid file ``/run/charon.pid`` is compiled in, so
  it is started as ``ip netns exec NS unshare --mount --propagation private
  sh -c 'mount -t tmpfs none /run && exec charon'`` (the PID we track is
  charon's own);
* its own ``swanctl.conf`` generated from :class:`Connection` objects and
  loaded with ``swanctl --load-all --file ... --uri unix://...``.

kernel-libipsec (libcharon-extra-plugins) does ESP in userspace over a TUN
device (``ipsec0``), because this kernel has no XFRM ESP. It can only send and
receive ESP in UDP (RFC 3948) through charon's own IKE socket, so the plugin
reports ``KERNEL_REQUIRE_UDP_ENCAPSULATION`` and charon fakes a NAT: an
initiator always floats to port 4500 after IKE_SA_INIT and every Child SA is
UDP-encapsulated. ``encap = yes`` in a connection says the same explicitly;
``local_port = remote_port = 4500`` starts IKE on 4500 (non-ESP marker) from
the first message. Routes: with ``install_routes = yes`` kernel-netlink puts
the remote traffic selectors into routing table 220 (with an ``ip rule``)
pointing at ``ipsec0``, with a source address from the local traffic selector
when the host owns one — so a site needs an address inside its ``local_ts``:
without one, libipsec's route install fails ("error installing route with
policy"), the Child SA is not created and a strongSwan responder answers
TS_UNACCEPTABLE.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.netns import Namespace

CHARON = "/usr/lib/ipsec/charon"
SWANCTL = "swanctl"
#: Plugins a PSK-only IKEv2 site with userspace ESP needs. openssl provides
#: AES-CBC/GCM, SHA-1/SHA-2, HMAC, ECP and MODP DH; kdf gives prf+ on 5.9.6+;
#: kernel-libipsec must come before kernel-netlink so it owns the IPsec part
#: and kernel-netlink only does routes and addresses.
PLUGINS = (
    "random nonce openssl kdf aes sha1 sha2 hmac gcm gmp "
    "kernel-libipsec kernel-netlink socket-default vici"
)


class StrongswanError(RuntimeError):
    """charon or swanctl failed (message includes swanctl's stderr)."""


def _secret(value: bytes | str) -> str:
    """swanctl secret syntax: hex for bytes (``0x..``), quoted text for str."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if '"' in value or "\\" in value:
        raise ValueError("PSK text may not contain quotes or backslashes; pass bytes")
    return f'"{value}"'


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Child:
    """One ``children`` section of a swanctl connection."""

    name: str = "net"
    local_ts: Sequence[str] = ("dynamic",)
    remote_ts: Sequence[str] = ("dynamic",)
    #: swanctl ESP proposal strings, e.g. ``"aes256gcm16"``, ``"aes128-sha256-modp2048"``.
    esp_proposals: Sequence[str] = ("aes256gcm16",)
    #: none | start | trap
    start_action: str = "none"
    #: Seconds as a swanctl time string ("0" disables).
    rekey_time: str = "0"
    life_time: str | None = None
    dpd_action: str = "clear"
    mode: str = "tunnel"
    #: Any further swanctl children keys (e.g. ``{"replay_window": 0}``).
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        keys: dict[str, Any] = {
            "local_ts": list(self.local_ts),
            "remote_ts": list(self.remote_ts),
            "esp_proposals": list(self.esp_proposals),
            "start_action": self.start_action,
            "rekey_time": self.rekey_time,
            "dpd_action": self.dpd_action,
            "mode": self.mode,
        }
        if self.life_time is not None:
            keys["life_time"] = self.life_time
        keys.update(self.extra)
        body = "".join(f"        {k} = {_value(v)}\n" for k, v in keys.items())
        return f"      {self.name} {{\n{body}      }}\n"


@dataclass
class Connection:
    """One IKEv2 PSK connection (swanctl ``connections.<name>`` + its secret)."""

    name: str
    local_addrs: str
    remote_addrs: str
    local_id: str
    remote_id: str
    psk: bytes | str = field(repr=False)
    #: swanctl IKE proposal strings, e.g. ``"aes256gcm16-prfsha384-ecp384"``.
    proposals: Sequence[str] = ("aes256gcm16-prfsha384-ecp384",)
    children: Sequence[Child] = (Child(),)
    local_port: int = 500
    remote_port: int = 500
    encap: bool = True
    mobike: bool = False
    rekey_time: str = "0"
    reauth_time: str = "0"
    dpd_delay: str = "0"
    dpd_timeout: str | None = None
    fragmentation: str = "yes"
    #: Any further swanctl connection keys.
    extra: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        keys: dict[str, Any] = {
            "version": 2,
            "local_addrs": self.local_addrs,
            "remote_addrs": self.remote_addrs,
            "local_port": self.local_port,
            "remote_port": self.remote_port,
            "proposals": list(self.proposals),
            "encap": self.encap,
            "mobike": self.mobike,
            "rekey_time": self.rekey_time,
            "reauth_time": self.reauth_time,
            "dpd_delay": self.dpd_delay,
            "fragmentation": self.fragmentation,
        }
        if self.dpd_timeout is not None:
            keys["dpd_timeout"] = self.dpd_timeout
        keys.update(self.extra)
        body = "".join(f"    {k} = {_value(v)}\n" for k, v in keys.items())
        local = f"    local {{\n      auth = psk\n      id = {self.local_id}\n    }}\n"
        remote = f"    remote {{\n      auth = psk\n      id = {self.remote_id}\n    }}\n"
        children = "".join(c.render() for c in self.children)
        return f"  {self.name} {{\n{body}{local}{remote}    children {{\n{children}    }}\n  }}\n"

    def render_secret(self) -> str:
        return (
            f"  ike-{self.name} {{\n    id-1 = {self.local_id}\n    id-2 = {self.remote_id}\n"
            f"    secret = {_secret(self.psk)}\n  }}\n"
        )


def swanctl_conf(connections: Iterable[Connection]) -> str:
    """The text of a ``swanctl.conf`` for ``connections`` (secrets included)."""
    conns = list(connections)
    return (
        "connections {\n"
        + "".join(c.render() for c in conns)
        + "}\nsecrets {\n"
        + "".join(c.render_secret() for c in conns)
        + "}\n"
    )


def strongswan_conf(
    *, vici_socket: str, log_path: str, log_levels: dict[str, int] | None = None, extra: str = ""
) -> str:
    """A self-contained ``strongswan.conf`` for one charon (and its swanctl)."""
    levels = {"default": 1, "ike": 2, "cfg": 1, "knl": 1, "net": 1, "enc": 1, "esp": 1}
    levels.update(log_levels or {})
    level_lines = "".join(f"      {k} = {v}\n" for k, v in levels.items())
    return f"""charon {{
  load_modular = no
  load = {PLUGINS}
  install_routes = yes
  install_virtual_ip = no
  retransmit_timeout = 1.0
  retransmit_base = 1.4
  retransmit_tries = 3
  half_open_timeout = 10
  filelog {{
    log {{
      path = {log_path}
      time_format = %H:%M:%S
      append = no
      flush_line = yes
      ike_name = yes
{level_lines}    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{vici_socket}
    }}
    kernel-libipsec {{
      allow_peer_ts = no
    }}
  }}
{extra}
}}
swanctl {{
  load = random nonce openssl pem pkcs1 pkcs8 x509 pubkey
  socket = unix://{vici_socket}
}}
"""


# --- swanctl --raw parser ---------------------------------------------------

_TOKEN = re.compile(r"\s*(?:([^\s{}\[\]=]+)\s*([{\[=])|(})|(\])|([^\s{}\[\]]+))")


def parse_raw(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``swanctl ... --raw`` output: lines ``<event> {k=v sec {...} lst [a b]}``.

    Returns ``[(event_name, body_dict), ...]``; sections become dicts, lists
    become lists of strings, values strings. Values never contain spaces or
    braces in the messages used here (list-sas, list-conns, stats).
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"([\w-]+(?: [\w-]+)*?)\s*\{", line)
        if not m:
            continue
        pos = m.end()
        body, pos = _parse_section(line, pos)
        out.append((m.group(1), body))
    return out


def _parse_section(text: str, pos: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            break
        pos = m.end()
        key, opener, close_sec = m.group(1), m.group(2), m.group(3)
        if close_sec:
            return result, pos
        if key is None:
            continue
        if opener == "=" and text.startswith("[", pos):
            opener, pos = "[", pos + 1
        if opener == "{":
            result[key], pos = _parse_section(text, pos)
        elif opener == "[":
            items: list[str] = []
            while pos < len(text):
                m2 = _TOKEN.match(text, pos)
                if not m2:
                    break
                pos = m2.end()
                if m2.group(4):
                    break
                items.append(m2.group(5) or m2.group(1) or "")
            result[key] = items
        else:
            vm = re.match(r"([^\s{}\[\]]*)", text[pos:])
            assert vm is not None
            result[key] = vm.group(1)
            pos += vm.end()
    return result, pos


def ike_sas(text: str) -> list[dict[str, Any]]:
    """IKE SAs from ``swanctl --list-sas --raw``: one dict per SA, with its
    connection ``name`` and ``child-sas`` as a list of dicts (each with ``name``)."""
    sas = []
    for event, body in parse_raw(text):
        if event != "list-sa event":
            continue
        for name, sa in body.items():
            sa = dict(sa)
            sa["name"] = name
            children = []
            for _key, child in (sa.get("child-sas") or {}).items():
                children.append(dict(child))
            sa["child-sas"] = children
            sas.append(sa)
    return sas


_DUMP_HEAD = re.compile(r" (\d+)\[\w+\] (?:<[^>]*> )?(.+?) => (\d+) bytes @ ")
_HEX_LINE = re.compile(r" (\d+)\[\w+\] (?:<[^>]*> )?\s+\d+: ((?:[0-9A-F]{2} ){1,16})")
_IKE_KEY = re.compile(r"^(Sk_\w+) secret$")
_CHILD_KEY = re.compile(r"^(encryption|integrity) (initiator|responder) key$")


def hex_dumps(log: str) -> list[tuple[str, bytes]]:
    """Every ``<label> => N bytes @ 0x...`` hex dump of a level-4 charon log,
    as (label, bytes) in log order. A dump's lines come from one thread; lines
    of other threads interleaved with it are skipped."""
    lines = log.splitlines()
    out: list[tuple[str, bytes]] = []
    for i, line in enumerate(lines):
        m = _DUMP_HEAD.search(line)
        if not m:
            continue
        thread, label, want = m.group(1), m.group(2), int(m.group(3))
        hexs = ""
        for follow in lines[i + 1 : i + 1 + 4 * (want // 16 + 2)]:
            if len(hexs) >= 2 * want:
                break
            hm = _HEX_LINE.search(follow)
            if hm and hm.group(1) == thread:
                hexs += hm.group(2).replace(" ", "")
        if len(hexs) == 2 * want:
            out.append((label, bytes.fromhex(hexs)))
    return out


def parse_ike_keys(log: str) -> list[dict[str, bytes]]:
    """The ``Sk_* secret`` dumps (RFC 7296 §2.14) grouped per IKE SA:
    ``sk_d``, ``sk_ai``, ``sk_ar``, ``sk_ei``, ``sk_er``, ``sk_pi``, ``sk_pr``
    (integrity keys absent for AEAD); a new ``sk_d`` starts a new SA."""
    sas: list[dict[str, bytes]] = []
    for label, data in hex_dumps(log):
        m = _IKE_KEY.match(label)
        if not m:
            continue
        name = m.group(1).lower()
        if name == "sk_d" or not sas:
            sas.append({})
        sas[-1][name] = data
    return sas


def parse_child_keys(log: str) -> list[dict[str, bytes]]:
    """Child SA KEYMAT dumps (RFC 7296 §2.17), one dict per derivation with
    ``encr_i``, ``encr_r``, ``integ_i``, ``integ_r`` ("i" = initiator of the
    exchange that created the SA; GCM keys include the 4-octet salt; no
    integrity keys for AEAD). Needs ``log_levels={"chd": 4}``."""
    out: list[dict[str, bytes]] = []
    for label, data in hex_dumps(log):
        m = _CHILD_KEY.match(label)
        if not m:
            continue
        key = ("encr_" if m.group(1) == "encryption" else "integ_") + m.group(2)[0]
        if key == "encr_i" or not out:
            out.append({})
        out[-1][key] = data
    return out


# --- the daemon ---------------------------------------------------------------


def _target(child: str | None, ike: str | None) -> list[str]:
    """swanctl's ``--child NAME`` / ``--ike NAME`` selection of an SA by config name."""
    return [*(["--child", child] if child else []), *(["--ike", ike] if ike else [])]


class Charon:
    """One charon daemon in namespace ``ns`` with its files under ``workdir``.

    Call :meth:`start`, :meth:`load`, then :meth:`initiate` /
    :meth:`list_sas` / :meth:`rekey` / :meth:`terminate`; :meth:`stop` ends it
    by PID (the namespace's topology would too).
    """

    def __init__(
        self,
        ns: Namespace,
        workdir: str | Path | None = None,
        *,
        name: str = "charon",
        log_levels: dict[str, int] | None = None,
        extra_conf: str = "",
    ) -> None:
        self.ns = ns
        self.name = name
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"anywan-{name}-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vici = self.dir / "charon.vici"
        self.log_path = self.dir / "charon.log"
        self.conf_path = self.dir / "strongswan.conf"
        self.swanctl_dir = self.dir / "swanctl"
        self.conf_path.write_text(
            strongswan_conf(
                vici_socket=str(self.vici),
                log_path=str(self.log_path),
                log_levels=log_levels,
                extra=extra_conf,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.connections: list[Connection] = []

    def __repr__(self) -> str:
        return f"Charon({self.name} in {self.ns.name}, pid={self.proc and self.proc.pid})"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "STRONGSWAN_CONF": str(self.conf_path)}

    @property
    def uri(self) -> str:
        return f"unix://{self.vici}"

    def start(self, timeout: float = 10.0) -> None:
        """Start charon and wait until its vici socket answers."""
        script = f"mount -t tmpfs anywan-run /run && exec {CHARON}"
        stderr = open(self.dir / "charon.stderr", "wb")  # noqa: SIM115 - lives with the process
        self.proc = self.ns.popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=self.env,
            stdout=stderr,
            stderr=stderr,
        )
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StrongswanError(f"{self}: charon exited {self.proc.returncode}: {self.log()}")
            if self.vici.exists():
                res = self._swanctl(["--stats"], check=False)
                if res.returncode == 0:
                    self._check_started()
                    return
            time.sleep(0.05)
        raise StrongswanError(f"{self}: vici socket did not come up in {timeout}s")

    def _check_started(self) -> None:
        """charon keeps running when a plugin fails to load (e.g. socket-default
        when port 500/4500 is taken in the namespace): fail loudly instead."""
        bad = [
            line
            for line in self.log().splitlines()
            if "failed to load" in line
            or ("plugin" in line and "failed" in line)
            or "unable to bind" in line
            or "could not open socket" in line
        ]
        if bad:
            self.stop_quietly()
            raise StrongswanError(f"{self}: charon started with errors: " + " | ".join(bad[:8]))

    def stop_quietly(self) -> None:
        if self.proc is not None:
            self.ns.topology.stop(self.proc)

    def _swanctl(
        self, args: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        # The vici socket is a file, so swanctl runs in any namespace.
        res = subprocess.run(
            [SWANCTL, *args, "--uri", self.uri],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise StrongswanError(
                f"{self.name}: swanctl {' '.join(args)} exited {res.returncode}: "
                f"{res.stdout.strip()[-2000:]} {res.stderr.strip()[-2000:]}"
            )
        return res

    def swanctl(self, *args: str, check: bool = True, timeout: float = 30.0) -> str:
        """Run any swanctl command against this charon; returns stdout."""
        return self._swanctl(list(args), check=check, timeout=timeout).stdout

    def load(self, connections: Iterable[Connection]) -> None:
        """Write ``swanctl.conf`` (mode 0600: it holds the PSKs) and load it
        with ``swanctl --load-all`` (replacing whatever was loaded before)."""
        self.connections = list(connections)
        self.swanctl_dir.mkdir(exist_ok=True)
        path = self.swanctl_dir / "swanctl.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(swanctl_conf(self.connections))
        self._swanctl(["--load-all", "--clear", "--file", str(path)])

    def initiate(
        self, *, child: str | None = None, ike: str | None = None, timeout: float = 15.0
    ) -> str:
        """``swanctl --initiate`` (blocks until established or failed);
        raises StrongswanError with swanctl's log lines on failure."""
        args = ["--initiate", "--timeout", str(int(timeout)), *_target(child, ike)]
        return self._swanctl(args, timeout=timeout + 5).stdout

    def list_sas(self) -> list[dict[str, Any]]:
        """IKE SAs as dicts (see :func:`ike_sas`): keys like ``state``,
        ``encr-alg``, ``encr-keysize``, ``prf-alg``, ``dh-group``, ``local-id``,
        ``remote-port``, ``nat-remote``, ``child-sas`` [{``state``, ``encr-alg``,
        ``spi-in``, ``encap``, ...}]."""
        return ike_sas(self._swanctl(["--list-sas", "--raw"]).stdout)

    def established(self, name: str | None = None) -> list[dict[str, Any]]:
        return [
            sa
            for sa in self.list_sas()
            if sa.get("state") == "ESTABLISHED" and (name is None or sa["name"] == name)
        ]

    def rekey(self, *, child: str | None = None, ike: str | None = None) -> None:
        """Start a rekey (``swanctl --rekey``) of the named child or IKE SA
        (by configuration name); returns once charon has queued it."""
        self._swanctl(["--rekey", *_target(child, ike)])

    def terminate(
        self, *, child: str | None = None, ike: str | None = None, timeout: float = 10.0
    ) -> None:
        """``swanctl --terminate`` (sends DELETE and waits for the answer)."""
        args = ["--terminate", "--timeout", str(int(timeout)), *_target(child, ike)]
        self._swanctl(args, timeout=timeout + 5)

    def log(self, *, raw: bool = False) -> str:
        """charon's log so far (and its stderr, if it wrote any). Hex dumps
        (level 4: keys, the PSK, message bytes) are removed unless ``raw``,
        so the text is safe to print in a test report."""
        text = ""
        with contextlib.suppress(FileNotFoundError):
            text = self.log_path.read_text(errors="replace")
        if not raw:
            text = "\n".join(line for line in text.splitlines() if not _HEX_LINE.search(line))
        with contextlib.suppress(FileNotFoundError):
            err = (self.dir / "charon.stderr").read_text(errors="replace")
            if err.strip():
                text += "\n[stderr]\n" + err
        return text

    def log_lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log().splitlines() if rx.search(line)]

    def ike_keys(self) -> list[dict[str, bytes]]:
        """SK_* of every IKE SA derived so far, oldest first, read from the
        log's hex dumps — needs ``log_levels={"ike": 4}`` (charon's
        keymat_v2 logs ``Sk_ei secret => 36 bytes`` at level 4). For tests
        only: the keys decrypt that charon's IKE traffic (tshark)."""
        return parse_ike_keys(self.log(raw=True))

    def child_keys(self) -> list[dict[str, bytes]]:
        """Child SA keys derived so far (see :func:`parse_child_keys`);
        needs ``log_levels={"chd": 4}``. Tests only."""
        return parse_child_keys(self.log(raw=True))

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1
    ) -> Any:
        """Poll ``predicate()`` until truthy (returned) or ``timeout`` (None)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value or time.monotonic() >= deadline:
                return value or None
            time.sleep(interval)

    def kill(self) -> None:
        """SIGKILL charon (by PID): it dies silently, sending no DELETE — a
        crashed or unplugged router, as far as its peer can tell."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        """End charon by PID (SIGTERM, then SIGKILL) and remove a temp workdir."""
        if self.proc is not None:
            self.ns.topology.stop(self.proc)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
