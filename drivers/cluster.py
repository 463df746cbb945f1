"""The Raspberry Pi 5 cluster over SSH (asyncssh) plus the readiness probe of the root's ``dllama-api``.

How commands are built: the driver receives the lab's command *templates* (a mapping name -> template,
e.g. ``dataclasses.asdict(cfg.commands)``) and the values to put in, and fills them itself with
:func:`drivers.templates.fill`, which shell-quotes every value. Callers never assemble shell text, and every
command the cluster runs is visible in (and configurable through) the lab config. Templates used here:
``health``, ``set_governor``, ``start_worker``, ``stop_worker``, ``start_root``, ``stop_root``,
``push``, ``size``, ``hash``, ``ambient``, ``provenance``.

Parsing follows what Raspberry Pi OS firmware prints: ``temp=48.3'C``, ``throttled=0x50005`` (bit 0
under-voltage, 1 arm frequency capped, 2 currently throttled, 3 soft temperature limit; bits 16-19 the
same conditions "has occurred since boot"), ``frequency(0)=2400000000`` (the Pi 5 firmware prints
``frequency(0)=`` for the arm clock), the governor's sysfs text and ``/proc/loadavg``.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from drivers.ssh import CommandFailed, RemoteStream, SshError, SshPool
from drivers.templates import fill

#: vcgencmd get_throttled bit -> name (the same bit + 16 means "has occurred since boot").
THROTTLE_BITS: dict[int, str] = {
    0: "under-voltage",
    1: "arm-frequency-capped",
    2: "throttled",
    3: "soft-temperature-limit",
}
GOVERNORS = ("performance", "ondemand", "powersave", "schedutil", "conservative", "userspace")
REQUIRED_TEMPLATES = frozenset({
    "health", "set_governor", "start_worker", "stop_worker", "start_root", "stop_root",
    "push", "size", "hash", "ambient", "provenance",
})

_TEMP = re.compile(r"^temp=(-?\d+(?:\.\d+)?)'C$")
_THROTTLED = re.compile(r"^throttled=(0x[0-9a-fA-F]+)$")
_CLOCK = re.compile(r"^frequency\(\d+\)=(\d+)$")
_LOADAVG = re.compile(r"^(\d+\.\d+) \d+\.\d+ \d+\.\d+ \d+/\d+ \d+$")
_SHA = re.compile(r"^([0-9a-f]{64})\s")
#: A governor's sysfs text: one lower-case word (kernels and vendors add their own, e.g. ``interactive``).
_GOVERNOR = re.compile(r"^[a-z][a-z0-9_]*$")
#: What may appear in ``user@host:path`` of a push: rsync hands the remote part to the node's login
#: shell, which (rsync < 3.2.4, still common) splits and expands it again, so no quoting survives there.
_REMOTE_SAFE = re.compile(r"^[A-Za-z0-9_./+%,=~-]+$")


# --------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class NodeHealth:
    """One health reading. ``ok`` means the node answered and every field was read; policy (too hot,
    throttled, wrong governor) is the caller's to judge from the fields."""

    node: str
    temp_c: float | None = None
    throttled: int | None = None
    throttled_now: tuple[str, ...] = ()
    throttled_since: tuple[str, ...] = ()
    arm_hz: int | None = None
    governor: str | None = None
    load1: float | None = None
    ok: bool = False
    error: str | None = None


@dataclass(frozen=True)
class FileCheck:
    """A copied file on the destination compared with what was expected."""

    path: str
    size: int | None
    sha256: str | None
    expected_size: int
    expected_sha256: str

    @property
    def ok(self) -> bool:
        return self.size == self.expected_size and self.sha256 == self.expected_sha256


@dataclass(frozen=True)
class Provenance:
    node: str
    kernel: str
    dllama: str | None


class CopyMismatch(Exception):
    """A deployed file differs from its source after the copy."""

    def __init__(self, node: str, checks: Sequence[FileCheck]) -> None:
        bad = [c for c in checks if not c.ok]
        names = ", ".join(f"{c.path} ({c.size} B, expected {c.expected_size} B)" for c in bad)
        super().__init__(f"the copy on {node} differs from the source: {names}; check the free space on {node} "
                         f"and deploy again.")
        self.node, self.checks = node, tuple(checks)


class UnsafeRemotePath(SshError):
    """A value would reach a second shell unquoted (rsync's remote side), so it is refused."""

    kind = "unsafe-path"


class ApiNotReady(Exception):
    """dllama-api did not answer ``GET /v1/models`` with 200 in time."""


class SensorError(Exception):
    """A sensor file could not be read or parsed."""


# --------------------------------------------------------------------------------------------------
# Parsing


def throttle_names(bits: int) -> tuple[str, ...]:
    """Names of the set bits among 0-3 of a throttled value (shift by 16 first for "since boot")."""
    return tuple(name for bit, name in THROTTLE_BITS.items() if bits >> bit & 1)


def parse_health(node: str, text: str) -> NodeHealth:
    """Parse the output of the ``health`` template (lines in any order; unknown lines are ignored)."""
    temp = throttled = clock = governor = load1 = None
    for raw in text.splitlines():
        line = raw.strip()
        if m := _TEMP.match(line):
            temp = float(m.group(1))
        elif m := _THROTTLED.match(line):
            throttled = int(m.group(1), 16)
        elif m := _CLOCK.match(line):
            clock = int(m.group(1))
        elif m := _LOADAVG.match(line):
            load1 = float(m.group(1))
        elif _GOVERNOR.match(line):
            governor = line
    missing = [name for name, v in (("temperature", temp), ("throttled state", throttled), ("arm clock", clock),
                                    ("governor", governor), ("load average", load1)) if v is None]
    error = f"{node} did not report its {', '.join(missing)}; check the health command template" if missing else None
    return NodeHealth(
        node=node,
        temp_c=temp,
        throttled=throttled,
        throttled_now=throttle_names(throttled) if throttled is not None else (),
        throttled_since=throttle_names(throttled >> 16) if throttled is not None else (),
        arm_hz=clock,
        governor=governor,
        load1=load1,
        ok=not missing,
        error=error,
    )


def parse_size(text: str) -> int | None:
    """The byte count ``stat -c %s`` printed (last integer line)."""
    for line in reversed(text.strip().splitlines()):
        if line.strip().isdigit():
            return int(line.strip())
    return None


def parse_sha256(text: str) -> str | None:
    for line in text.splitlines():
        if m := _SHA.match(line.strip() + " "):
            return m.group(1)
    return None


def parse_millidegrees(text: str) -> float:
    """A DS18B20 ``temperature`` file: integer millidegrees Celsius."""
    value = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not re.fullmatch(r"-?\d+", value):
        raise SensorError(f"the ambient sensor printed {value!r} instead of millidegrees; check that the DS18B20 is "
                          f"connected and the ambient command template")
    return int(value) / 1000.0


_RSYNC_REMOTE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^/:]+|\[[^\]]+\]):(?P<path>.*)$")


def check_push(dest: str, files: Sequence[str]) -> None:
    """Refuse a ``[user@]host:path`` destination or sources that would be unsafe in a ``push`` template."""
    m = _RSYNC_REMOTE.match(dest)
    if m is None:
        _push_destination("the destination", "", "localhost", dest, files)
        return
    host = m.group("host").strip("[]")
    _push_destination(host, m.group("user") or "", host, m.group("path") or ".", files)


def _push_destination(node: str, user: str, address: str, dest_dir: str, files: Sequence[str]) -> str:
    """``user@host:dir/`` for the push template, or :class:`UnsafeRemotePath` when a value is unsafe.

    The local shell gets every value quoted (:func:`fill`), but the destination's path is run through the
    node's shell a second time by rsync, and a source starting with ``-`` would be read as an option.
    """
    host = f"[{address}]" if ":" in address else address
    for what, value in (("model directory", dest_dir), ("user", user), ("address", address)):
        if value and (not _REMOTE_SAFE.match(value) or value.startswith("-")):
            raise UnsafeRemotePath(node, f"the {what} {value!r} for {node} holds characters that rsync's remote "
                                         f"shell would interpret; use only letters, digits and ._-/ in "
                                         f"[cluster] model_dir and hosts.{node}.")
    for f in files:
        if f.startswith("-"):
            raise UnsafeRemotePath(node, f"the file {f!r} would be read by rsync as an option; pass it as an "
                                         f"absolute path.")
    return f"{user}@{host}:{dest_dir.rstrip('/')}/"


# --------------------------------------------------------------------------------------------------
# API readiness


async def wait_api_ready(url: str, timeout: float, interval: float = 0.5) -> float:
    """Poll ``GET {url}/v1/models`` until it answers 200; the seconds it took. Raises :class:`ApiNotReady`."""
    probe = url.rstrip("/") + "/v1/models"
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = "no answer"
    client_timeout = aiohttp.ClientTimeout(total=max(1.0, min(5.0, timeout)))
    async with aiohttp.ClientSession(timeout=client_timeout) as http:
        while True:
            try:
                async with http.get(probe) as resp:
                    if resp.status == 200:
                        return loop.time() - start
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            remaining = timeout - (loop.time() - start)
            if remaining <= 0:
                raise ApiNotReady(f"dllama-api at {url} was not ready after {timeout:g} s (last: {last}); read its "
                                  f"log (/tmp/dllama-api.log on the root node) and check the model files.")
            await asyncio.sleep(min(interval, remaining))


# --------------------------------------------------------------------------------------------------
# The cluster


class Cluster:
    """The Pis: health, governor, distributed-llama workers and root, file verification, ambient sensor."""

    def __init__(
        self,
        pool: SshPool,
        templates: Mapping[str, str],
        *,
        nodes: Sequence[str],
        root: str,
        worker_port: int = 9998,
        api_port: int = 9990,
        nthreads: int = 4,
        ambient_host: str | None = None,
        api_host: str = "",
    ) -> None:
        missing = REQUIRED_TEMPLATES - set(templates)
        if missing:
            raise KeyError(f"command templates missing: {', '.join(sorted(missing))}")
        if root not in nodes:
            raise ValueError(f"root {root!r} is not one of the nodes {list(nodes)}")
        self.pool = pool
        self.templates = dict(templates)
        self.nodes = tuple(nodes)
        self.root = root
        self.worker_port, self.api_port, self.nthreads = worker_port, api_port, nthreads
        self.ambient_host = ambient_host or root
        self.api_host = api_host or pool.target(root).address

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(n for n in self.nodes if n != self.root)

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def command(self, template: str, **values: object) -> str:
        return fill(self.templates[template], **values)

    # -- health ----------------------------------------------------------------------------------

    async def health(self, node: str, timeout: float = 10.0) -> NodeHealth:
        """Read one node's health; never raises for an unreachable node (``ok=False`` with the reason)."""
        try:
            result = await self.pool.run(node, self.command("health"), timeout=timeout)
        except SshError as exc:
            return NodeHealth(node=node, ok=False, error=str(exc))
        return parse_health(node, result.stdout)

    async def health_all(self, timeout: float = 10.0) -> dict[str, NodeHealth]:
        readings = await asyncio.gather(*(self.health(n, timeout) for n in self.nodes))
        return {h.node: h for h in readings}

    async def set_governor(self, node: str, governor: str) -> None:
        """Write the CPU frequency governor (``performance`` for measurements)."""
        await self.pool.run(node, self.command("set_governor", governor=governor), check=True)

    # -- distributed-llama -------------------------------------------------------------------------

    def worker_addresses(self) -> tuple[str, ...]:
        return tuple(f"{self.pool.target(n).address}:{self.worker_port}" for n in self.workers)

    async def _on_all(self, nodes: Sequence[str], template: str, **values: object) -> None:
        results = await asyncio.gather(
            *(self.pool.run(n, self.command(template, **values)) for n in nodes), return_exceptions=True
        )
        for node, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                raise res
            # ``pkill -f PATTERN`` also matches the remote shell running it when the pattern is in its own
            # command line (``bash -c "pkill -f 'dllama worker' || true"``), so a stop command can end by
            # SIGTERM having done its work. '[d]llama worker' avoids that; tolerate templates that do not.
            if template.startswith("stop_") and res.exit_signal == "TERM":
                continue
            if not res.ok:
                raise CommandFailed(node, res, what=template.replace("_", " "))

    async def start_workers(self) -> None:
        """Start ``dllama worker`` on every non-root node (detached; it outlives the SSH session)."""
        await self._on_all(self.workers, "start_worker", port=self.worker_port, nthreads=self.nthreads)

    async def stop_workers(self) -> None:
        await self._on_all(self.workers, "stop_worker")

    async def start_root(self, model: str, tokenizer: str, workers: Sequence[str] | None = None) -> None:
        """Start ``dllama-api`` on the root with the workers' ``host:port`` (default: every non-root node)."""
        await self._on_all(
            (self.root,), "start_root", port=self.api_port, model=model, tokenizer=tokenizer,
            nthreads=self.nthreads, workers=list(workers if workers is not None else self.worker_addresses()),
        )

    async def stop_root(self) -> None:
        await self._on_all((self.root,), "stop_root")

    async def wait_api_ready(self, url: str | None = None, timeout: float = 600.0, interval: float = 0.5) -> float:
        return await wait_api_ready(url or self.api_url, timeout, interval)

    # -- files -----------------------------------------------------------------------------------

    async def file_info(self, host: str, path: str, timeout: float | None = None) -> tuple[int | None, str | None]:
        """Size (``stat -c %s``) and SHA-256 (``sha256sum``) of a file on a host; None where unreadable."""
        size_res = await self.pool.run(host, self.command("size", path=path), timeout=timeout)
        hash_res = await self.pool.run(host, self.command("hash", path=path), timeout=timeout)
        size = parse_size(size_res.stdout) if size_res.ok else None
        digest = parse_sha256(hash_res.stdout) if hash_res.ok else None
        return size, digest

    async def copy_and_verify(
        self,
        source: str,
        files: Sequence[str],
        node: str,
        dest_dir: str,
        expected: Mapping[str, tuple[int, str]] | None = None,
        timeout: float = 3600.0,
    ) -> tuple[FileCheck, ...]:
        """Push ``files`` from host ``source`` into ``dest_dir`` on ``node`` (the ``push`` template runs on
        the source) and compare size and SHA-256 with ``expected`` (path -> (size, sha256); measured on the
        source when not given). Raises :class:`CopyMismatch` when a copy differs."""
        if expected is None:
            expected = {}
            for f in files:
                size, digest = await self.file_info(source, f, timeout)
                if size is None or digest is None:
                    raise SensorError(f"{f} cannot be read on {source}; check the surgery output path")
                expected[f] = (size, digest)
        target = self.pool.target(node)
        dest = _push_destination(node, target.user, target.address, dest_dir, files)
        await self.pool.run(source, self.command("push", files=list(files), dest=dest), timeout=timeout, check=True)
        checks = []
        for f in files:
            remote = posixpath.join(dest_dir, posixpath.basename(f))
            size, digest = await self.file_info(node, remote, timeout)
            checks.append(FileCheck(remote, size, digest, *expected[f]))
        if not all(c.ok for c in checks):
            raise CopyMismatch(node, checks)
        return tuple(checks)

    # -- misc ------------------------------------------------------------------------------------

    def stream(self, node: str, command: str, *, timeout: float | None = None) -> RemoteStream:
        """Run a long command (already filled) and iterate over its output lines; ``cancel()`` kills it."""
        return self.pool.stream(node, command, timeout=timeout)

    async def lines(self, node: str, command: str, *, timeout: float | None = None) -> AsyncIterator[str]:
        """Convenience generator over :meth:`stream` that always cancels the remote command on exit."""
        async with self.stream(node, command, timeout=timeout) as s:
            async for line in s:
                yield line

    async def ambient_c(self, timeout: float = 10.0) -> float:
        """Room temperature from the DS18B20 on ``ambient_host`` (its file holds millidegrees)."""
        res = await self.pool.run(self.ambient_host, self.command("ambient"), timeout=timeout)
        if not res.ok:
            raise SensorError(f"the ambient sensor on {self.ambient_host} cannot be read "
                              f"({res.stderr_tail(1) or 'no output'}); check the DS18B20 wiring and that w1-gpio is "
                              f"enabled")
        return parse_millidegrees(res.stdout)

    async def provenance(self, node: str, timeout: float = 10.0) -> Provenance:
        """Kernel release and distributed-llama version of a node (recorded with every run)."""
        res = await self.pool.run(node, self.command("provenance"), timeout=timeout)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        return Provenance(node, lines[0] if lines else "", lines[1] if len(lines) > 1 else None)
