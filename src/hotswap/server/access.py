"""Who may reach the server and what the host-touching routes may do: the `hotswap serve` access policy.

Browsers are the threat here, not the RL frameworks (which send JSON from non-browser clients, with no
Origin header): without an API key a web page could otherwise drive the weight routes of a server on
localhost. So every request must
- name an allowed Host (an IP literal, `localhost`, or one of `allowed_hosts`): a DNS-rebinding page
  reaches us under its own host name;
- come from no Origin, the server's own origin, or one of `allowed_origins`, and not be a cross-site
  browser request (`Sec-Fetch-Site`);
- carry a JSON content type when it sends a body, and never a form or `text/plain` one even with an empty
  body (those are what a page can send cross-site without a CORS preflight; a form with no fields still
  carries a query string, which the vLLM-style routes read).
Saves are confined too: `save_sharded_model` writes only under `save_roots`, `save_remote_model` only to
`remote_model_stores`; with none configured, the route is refused."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.errors import shown
from hotswap.scheduler.profiler import default_profile_dir
from hotswap.server.http_utils import APIError

if TYPE_CHECKING:
    from starlette.requests import Request

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_EXEMPT_PATHS = frozenset({"/health"})  # probes from load balancers and orchestrators
# the content types a page may POST cross-site without a CORS preflight (the fetch standard's safelist)
_CROSS_SITE_TYPES = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain"})


@dataclass(kw_only=True, slots=True, frozen=True)
class AccessPolicy:
    allowed_hosts: tuple[str, ...] = ()  # Host names besides IP literals and localhost ("*": any)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own ("*": any)
    save_roots: tuple[str, ...] = ()  # folders save_sharded_model may write under (none: refused over HTTP)
    remote_model_stores: tuple[str, ...] = ()  # URL prefixes save_remote_model may write to (none: refused)

    # ---- requests ------------------------------------------------------------------------------------

    def check_request(self, method: str, path: str, headers: dict[bytes, bytes]) -> None:
        """Raise APIError (403 / 415) for a request this policy refuses."""
        if path in _EXEMPT_PATHS:
            return
        host = headers.get(b"host", b"").decode("latin-1").strip()
        if host and not self._host_allowed(host):
            raise APIError(403, f"Host {shown(host)} is not allowed: use an IP address or localhost, or start the server with "
                                "--allowed-hosts NAME", type_="PermissionDeniedError")
        origin = headers.get(b"origin")
        if origin is not None:
            origin_text = origin.decode("latin-1").strip()
            if not self._origin_allowed(origin_text, host):
                raise APIError(403, f"cross-origin request from {shown(origin_text)} refused; start the server with "
                                    "--allowed-origins ORIGIN to allow it", type_="PermissionDeniedError")
        elif headers.get(b"sec-fetch-site", b"").lower() in (b"cross-site", b"same-site"):
            raise APIError(403, "cross-site browser request refused", type_="PermissionDeniedError")
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        # a form post with an empty body still reaches the routes that read their query string (pause, sleep, ...)
        if method in _BODY_METHODS and (_has_body(headers) or ctype in _CROSS_SITE_TYPES):
            if ctype != b"application/json" and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
                got = shown(ctype.decode("latin-1")) if ctype else "none"
                raise APIError(415, f"request bodies must be JSON: send 'Content-Type: application/json' (got {got})",
                               type_="UnsupportedMediaType")

    def _host_allowed(self, host: str) -> bool:
        name = _strip_port(host).lower()
        if name == "localhost" or "*" in self.allowed_hosts or name in (h.lower() for h in self.allowed_hosts):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True  # DNS rebinding needs a host name; an address is whoever the client connected to

    def _origin_allowed(self, origin: str, host: str) -> bool:
        if "*" in self.allowed_origins or origin.rstrip("/") in (o.rstrip("/") for o in self.allowed_origins):
            return True
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme in ("http", "https") and bool(host) and rest.rstrip("/").lower() == host.lower()

    # ---- saves -----------------------------------------------------------------------------------------

    def check_save_path(self, path: str) -> None:
        """save_sharded_model over HTTP writes only inside one of `save_roots` (after resolving symlinks)."""
        if not self.save_roots:
            raise APIError(403, "save_sharded_model is off on this server: start it with --save-root DIR to allow saves under DIR",
                           param="path", type_="PermissionDeniedError")
        target = _usable(path, "path")
        if any(_inside(target, root) for root in self.save_roots):
            return
        raise APIError(403, f"path {shown(path)} is outside the folders this server may save to ({', '.join(self.save_roots)})",
                       param="path", type_="PermissionDeniedError")

    def check_profile_dir(self, output_dir: str) -> None:
        """start_profile over HTTP writes traces only into the default profile folder (SGLANG_TORCH_PROFILER_DIR, under
        which any folder goes, else /tmp itself) or inside one of `save_roots` (after resolving symlinks)."""
        default = default_profile_dir()
        roots = (*([default] if os.environ.get("SGLANG_TORCH_PROFILER_DIR") else []), *self.save_roots)
        target = _usable(output_dir, "output_dir")
        if target == _real(default) or any(_inside(target, root) for root in roots):
            return
        raise APIError(403, f"output_dir {shown(output_dir)} is outside the folders this server may write traces to ({default}"
                            f"{''.join(', ' + r for r in self.save_roots)}; --save-root DIR adds one)", param="output_dir",
                       type_="PermissionDeniedError")


def refuse_browser_get(request: Request) -> None:
    """A GET that changes state is refused when a browser sent it (Origin or Sec-Fetch-Site): a link or an <img>
    on any page cannot trigger it. Frameworks' clients send neither."""
    if request.method == "GET" and (request.headers.get("origin") is not None
                                    or request.headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")):
        raise APIError(403, f"GET {request.url.path} from a browser page is refused; POST it", type_="PermissionDeniedError")


def _real(path: str) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _usable(path: str, param: str) -> Path:
    """A client's path resolved (symlinks followed), or 400 when it cannot name a file (a NUL byte, a name too long)."""
    try:
        return _real(path)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise APIError(400, f"{param} {shown(path)} is not a usable path: {why}", param=param) from None


def _inside(target: Path, root: str) -> bool:
    real_root = _real(root)
    return target == real_root or real_root in target.parents


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers


def split_list(value: str | None) -> tuple[str, ...]:
    """A comma-separated flag value as a tuple (empty items dropped)."""
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())
