"""A Debian bookworm container with a real systemd as PID 1 (systemd-nspawn), for tests of the unit.

The root filesystem is built once with debootstrap (minbase plus systemd,
python3, python3-venv, ca-certificates, procps and jq) from the mirror apt
already uses, with this machine's extra CA certificates and ``/etc/pip.conf``
copied in so pip works inside (pip's other configuration files and the local
wheel and index directories they name are bound in read-only at each boot). It is cached under ``/var/cache/commsync-tests``
(``$COMMSYNC_NSPAWN_CACHE``) in a directory named by a hash of everything that
goes into it; a change of any input builds a new one, and trees unused for a
week are removed.

Each ``Container`` boots that tree with ``--volatile=overlay``: everything it
writes goes to a tmpfs above the cached tree, which stays untouched, so every
boot starts clean. It shares the host's network, so servers the tests start on
127.0.0.1 are reachable from inside. Commands run inside through ``nsenter``
into PID 1's namespaces, with a clean environment (as root on a server).

Run ``python tests/nspawn.py build`` to build (or find) the tree by hand.
"""

from __future__ import annotations

import configparser
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("COMMSYNC_NSPAWN_CACHE", "/var/cache/commsync-tests"))
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "procps", "jq")
# Timers and a getty a test machine does not need: a quicker, quieter boot.
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "console-getty.service")
RECIPE = 1  # bump when the build steps below change
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# pip's configuration here, bound read-only into the container at the same paths, with the
# local wheel and index directories it names (/etc/pip.conf itself is copied into the tree).
PIP_CONFIGS = ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", "/root/.config/pip/pip.conf", "/root/.pip/pip.conf")
PIP_DIRS = ("/etc/xdg/pip", "/root/.config/pip", "/root/.pip")
PIP_PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint")


class Unavailable(RuntimeError):
    """This machine cannot build or boot the container; the message says why."""


def missing_requirement() -> str | None:
    """Why no container can run here, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install systemd-container debootstrap)"
    return None


def mirror() -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources), else deb.debian.org."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                parts = line.split("#")[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    words = [p for p in parts[1:] if not p.startswith("[")]
                    if len(words) >= 2 and words[1] == SUITE:
                        return words[0]
    return "http://deb.debian.org/debian"


def pip_binds() -> list[Path]:
    """pip's configuration directories and the local paths its files name, as far as they exist."""
    found = {Path(d) for d in PIP_DIRS if Path(d).is_dir()}
    for conf in map(Path, PIP_CONFIGS):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(conf)
        except (OSError, configparser.Error):
            continue
        for section in parser.sections():
            for key in PIP_PATH_KEYS:
                for word in parser.get(section, key, fallback="").split():
                    path = Path(word.removeprefix("file://"))
                    if path.name == "simple":
                        path = path.parent  # a local index's pages link to ../files/*.whl
                    if path.is_absolute() and path.exists():
                        found.add(path)
    # A path inside another one is bound with it.
    return sorted(p for p in found if not any(o != p and o in p.parents for o in found))


def _extra_ca_certs() -> list[Path]:
    return sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key() -> str:
    """A hash of everything that goes into the tree."""
    inputs = {
        "recipe": RECIPE,
        "suite": SUITE,
        "packages": PACKAGES,
        "masked": MASKED,
        "mirror": mirror(),
        "ca": {str(p): _digest(p) for p in _extra_ca_certs()},
        "pip.conf": _digest(Path("/etc/pip.conf")) if Path("/etc/pip.conf").exists() else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def rootfs(log=print) -> Path:
    """The cached tree, built first if needed (about 2 minutes with a nearby mirror)."""
    reason = missing_requirement()
    if reason:
        raise Unavailable(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"{SUITE}-{cache_key()}"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        _prune(keep=root)
        if (root / ".complete").exists():
            (root / ".complete").touch()  # in use: see _prune
            return root
        started = time.monotonic()
        log(f"nspawn: building {root} from {mirror()} (cached for later runs)")
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _build(tmp)
        (tmp / ".complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
        tmp.rename(root)
        log(f"nspawn: built {root} in {time.monotonic() - started:.0f} s")
    return root


def _prune(keep: Path, days: float = 7) -> None:
    """Remove trees of other inputs unused for ``days`` (another checkout may be booting one).

    Called under the build lock, so a tree without its marker is a build that died.
    """
    for other in CACHE.glob(f"{SUITE}-*"):
        marker = other / ".complete"
        if other != keep and (not marker.exists() or time.time() - marker.stat().st_mtime > days * 86400):
            shutil.rmtree(other, ignore_errors=True)


def _build(tmp: Path) -> None:
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), mirror()]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-20:])
        log_file = tmp / "debootstrap" / "debootstrap.log"
        if log_file.exists():
            tail += "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-20:])
        raise Unavailable(f"debootstrap failed ({res.returncode}):\n{tail}")
    # The egress proxy's CA (and any other local CA) so pip inside trusts what pip here trusts.
    for cert in _extra_ca_certs():
        shutil.copy2(cert, tmp / "usr/local/share/ca-certificates" / cert.name)
    subprocess.run(["chroot", str(tmp), "update-ca-certificates"], check=True, capture_output=True)
    if Path("/etc/pip.conf").exists():
        shutil.copy2("/etc/pip.conf", tmp / "etc/pip.conf")
    for unit in MASKED:
        link = tmp / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (tmp / "etc/hostname").write_text("commsync-test\n")
    shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
    (tmp / "var/cache/apt/archives/partial").mkdir(parents=True)


class Container:
    """One booted container. ``run()`` executes a shell command inside as root."""

    def __init__(self, root: Path, name: str = "commsync-test", *, log_path: Path | None = None):
        self.root = root
        self.name = name
        self.log_path = log_path or CACHE / f"{name}.console.log"
        self.leader: int | None = None
        self._proc: subprocess.Popen | None = None

    def boot(self, timeout: float = 60.0) -> Container:
        binds = [f"--bind-ro={p}" for p in pip_binds()]
        cmd = ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "-M", self.name, "--register=no", "--keep-unit", "--volatile=overlay", *binds]
        with open(self.log_path, "wb") as console:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        try:
            self.leader = self._wait_leader(started + timeout)
            # "running", or "degraded" when some unit failed: booted either way. Until
            # systemd listens on its socket the command fails at once: ask again.
            state = ""
            while state not in ("running", "degraded"):
                if time.monotonic() > started + timeout:
                    raise Unavailable(f"systemd in the container did not come up ({state or 'no answer'}):\n{self.console_tail()}")
                if self._proc.poll() is not None:
                    raise Unavailable(f"systemd-nspawn exited with {self._proc.returncode}:\n{self.console_tail()}")
                state = self.run("systemctl is-system-running --wait", check=False, timeout=timeout).stdout.strip()
                if state not in ("running", "degraded"):
                    time.sleep(0.2)
        except BaseException:
            self.poweroff()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _wait_leader(self, deadline: float) -> int:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise Unavailable(f"systemd-nspawn exited with {self._proc.returncode}:\n{self.console_tail()}")
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
            try:
                pids = [int(p) for p in children.read_text().split()]
            except OSError:
                pids = []
            for pid in pids:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return pid
                except OSError:
                    pass
            time.sleep(0.1)
        raise Unavailable(f"no systemd came up in the container:\n{self.console_tail()}")

    def run(self, command: str, *, check: bool = True, input: str | bytes | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``bash -c command`` inside, as root with a clean environment; text output."""
        assert self.leader is not None, "not booted"
        argv = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "bash", "-c", command]
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run(argv, input=data, stdin=None if data is not None else subprocess.DEVNULL, capture_output=True, timeout=timeout)
        out = subprocess.CompletedProcess(argv, res.returncode, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise AssertionError(f"in the container: {command}\nexit {out.returncode}\n{out.stdout}{out.stderr}")
        return out

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        """Create or replace a file inside (parents created)."""
        self.run(f"install -D -m {mode} /dev/stdin {shlex.quote(path)}", input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run(f"systemctl show {shlex.quote(unit)} " + " ".join(f"-p {p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's current end, for ``journal(after=...)``."""
        out = self.run("journalctl -n 0 --show-cursor --no-pager").stdout
        match = re.search(r"-- cursor: (\S+)", out)
        assert match, out
        return match.group(1)

    def journal(self, *args: str, after: str | None = None) -> list[dict]:
        """Journal entries (``-o json``), optionally after a cursor, filtered by journalctl ``args``."""
        cmd = ["journalctl", "--no-pager", "-o", "json", *args]
        if after:
            # Not --after-cursor: with matches, journalctl 252 skips the first matching
            # entry when the cursor's own entry does not match. --cursor includes it.
            cmd.append(f"--cursor={after}")
        out = self.run(shlex.join(cmd)).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [e for e in entries if e.get("__CURSOR") != after]

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def poweroff(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self.leader is not None:
            # SIGRTMIN+4 asks systemd for an orderly poweroff.
            try:
                os.kill(self.leader, signal.SIGRTMIN + 4)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> Container:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.poweroff()


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python tests/nspawn.py build")
    started = time.monotonic()
    print(rootfs())
    print(f"{time.monotonic() - started:.0f} s")
