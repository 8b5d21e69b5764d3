"""Who an agent runs as (`run_as`): the user's uid and groups, whether this process can start an agent
as that user, and the folder Fleet gives it as its HOME and working directory.

The switch itself happens in fleet/launcher.py's forked child (setgroups, setgid, setuid, every
capability dropped, then the parent-death signal, the folder, exec). What is decided beforehand, by the
executor and by `fleet doctor`:
- To start an agent as another user and stop it again, this process needs CAP_SETUID and CAP_SETGID
  (the switch) and CAP_KILL (signalling a process of another uid), both now and after exec (the
  launcher is exec'd): root has them unless they were dropped; a non-root worker only as ambient
  capabilities (compose/ starts it so). An agent whose user is this process's own needs none.
- Each agent gets `<FLEET_AGENT_HOMES>/<agent>`, 0700, owned by its user: its HOME and the folder it
  starts in. Fleet creates it on the agent's first run (and gives it to a new owner when run_as
  changes), which takes root or CAP_CHOWN; the folder above is this user's, 0711, so agents can reach
  their own folder but not list or enter the others'. Every folder above that must let them pass.
Stdlib only: `fleet doctor` and the executor import it, and so may a test under the system Python.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import ConfigError

CAP_CHOWN, CAP_KILL, CAP_SETGID, CAP_SETUID = 0, 5, 6, 7
SWITCH_CAPABILITIES = {"CAP_SETUID": CAP_SETUID, "CAP_SETGID": CAP_SETGID, "CAP_KILL": CAP_KILL}


@dataclass(frozen=True)
class AgentUser:
    """A `run_as` user resolved on this host."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group it belongs to, its primary one included

    @property
    def creds(self) -> str:
        """The launcher's `creds=` value: uid:gid:groups."""
        return f"{self.uid}:{self.gid}:{','.join(map(str, self.groups))}"

    @property
    def is_self(self) -> bool:
        """Whether this process already runs as this user (no switch needed)."""
        return self.uid == os.geteuid()


@dataclass(frozen=True)
class Account:
    """How one agent runs on this host: as whom, with which launcher creds, in which folder."""

    user: AgentUser
    home: Path
    creds: str | None  # None: this process is that user already

    def environment(self) -> dict[str, str]:
        """The variables that tell the agent who and where it is."""
        return {"HOME": str(self.home), "USER": self.user.name, "LOGNAME": self.user.name}


def lookup(name: str) -> AgentUser:
    """The user named `name` on this host; ConfigError when there is none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"no user {name!r} on this host") from None
    groups = tuple(dict.fromkeys([entry.pw_gid, *os.getgrouplist(name, entry.pw_gid)]))
    return AgentUser(name, entry.pw_uid, entry.pw_gid, groups)


def group_name(gid: int) -> str:
    """A group's name, or its number."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# ---------------------------------------------------------------- capabilities


def _capability_sets() -> dict[str, int] | None:
    """CapEff, CapAmb, CapBnd, ... of this process (None where /proc does not say)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return {key: int(value, 16) for key, _, value in (line.partition(":\t") for line in lines)
            if key.startswith("Cap") and value}


def missing_capabilities(user: AgentUser) -> list[str]:
    """The capabilities this process lacks to start an agent as `user` and stop it again (none: it can)."""
    if user.is_self:
        return []
    sets = _capability_sets()
    if sets is None:  # not Linux: only root can switch
        return [] if os.geteuid() == 0 else list(SWITCH_CAPABILITIES)
    # The launcher is exec'd: as root it gets the bounding set, otherwise only the ambient one survives.
    after_exec = sets.get("CapBnd", 0) if os.geteuid() == 0 else sets.get("CapAmb", 0)
    usable = sets.get("CapEff", 0) & after_exec
    return [name for name, bit in SWITCH_CAPABILITIES.items() if not usable >> bit & 1]


def can_chown() -> bool:
    """Whether this process may give a file to another user (root, or CAP_CHOWN)."""
    sets = _capability_sets()
    return os.geteuid() == 0 if sets is None else bool(sets.get("CapEff", 0) >> CAP_CHOWN & 1)


def switch_problem(agent: str, user: AgentUser) -> str | None:
    """Why this process cannot run `agent` as `user` (None: it can)."""
    missing = missing_capabilities(user)
    if not missing:
        return None
    return (f"agent {agent!r} has run_as = {user.name!r}, but this worker (uid {os.geteuid()}) cannot start it "
            f"as that user: it lacks {', '.join(missing)}; run the worker as root, or give it these capabilities "
            "as ambient ones (compose/ does), or remove run_as. Fleet never runs it as the worker's own user instead")


# ---------------------------------------------------------------- the agent's folder


def blocked_at(path: Path, user: AgentUser) -> Path | None:
    """The first folder on the way to `path` (itself included) that `user` may not enter, by its mode
    bits; None when every one lets it pass (or a folder does not exist yet: it will be created)."""
    if user.uid == 0:
        return None
    current = Path(path.anchor)
    for part in path.absolute().parts[1:]:
        current = current / part
        try:
            info = current.stat()
        except FileNotFoundError:
            return None
        if not _may(info, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return current
    return None


def can_execute(path: Path, user: AgentUser) -> bool:
    """Whether `user` may reach and execute `path` (its target, for a link), by mode bits."""
    real = Path(os.path.realpath(path))
    try:
        info = real.stat()
    except OSError:
        return False
    return blocked_at(real.parent, user) is None and (
        user.uid == 0 or _may(info, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH))


def _may(info: os.stat_result, user: AgentUser, owner: int, group: int, other: int) -> bool:
    if info.st_uid == user.uid:
        return bool(info.st_mode & owner)
    if info.st_gid in user.groups:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)


def home_of(homes: Path, agent: str) -> Path:
    """Where `agent`'s folder is."""
    return homes.absolute() / agent


def prepare_home(homes: Path, agent: str, user: AgentUser) -> Path:
    """`agent`'s folder, created 0700 and owned by `user` if it is not yet; ConfigError when it cannot be."""
    base = homes.absolute()
    try:
        if not base.is_dir():
            with contextlib.suppress(FileExistsError):  # another executor was first
                base.mkdir(parents=True)
                base.chmod(0o711)  # agents pass through to their own folder; they cannot list the others
        info = base.stat()
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"FLEET_AGENT_HOMES {base} must belong to this user (uid {os.geteuid()}) and be "
                              "writable by nobody else: an agent could swap another's folder otherwise")
        home = home_of(base, agent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(home, 0o700)
        info = os.lstat(home)
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{home} is not a folder")
        if (info.st_uid, info.st_gid) != (user.uid, user.gid):
            os.chown(home, user.uid, user.gid, follow_symlinks=False)
    except PermissionError as exc:
        raise ConfigError(f"cannot give agent {agent!r} its folder {base / agent} as user {user.name!r} "
                          f"({exc.strerror}): creating it or changing its owner takes root or CAP_CHOWN") from None
    except OSError as exc:
        raise ConfigError(f"cannot create agent {agent!r}'s folder in {base} ({exc.strerror})") from None
    blocked = blocked_at(home, user)
    if blocked is not None:
        raise ConfigError(_blocked(agent, user, blocked, home))
    return home


def _blocked(agent: str, user: AgentUser, blocked: Path, home: Path) -> str:
    return (f"user {user.name!r} (agent {agent!r}) cannot enter {blocked}, on the way to its folder {home}: "
            f"let others pass (chmod o+x {blocked}) or set FLEET_AGENT_HOMES elsewhere")


def home_problem(homes: Path, agent: str, user: AgentUser) -> str | None:
    """Why `prepare_home` would fail for this agent, found without changing anything (None: it would not)."""
    home = home_of(homes, agent)
    try:
        info = os.lstat(home)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        return f"cannot look at agent {agent!r}'s folder {home} ({exc.strerror})"
    ready = info is not None and stat.S_ISDIR(info.st_mode) and (info.st_uid, info.st_gid) == (user.uid, user.gid)
    if not ready and not user.is_self and not can_chown():
        return (f"agent {agent!r}'s folder {home} is not yet {user.name!r}'s, and this worker (uid {os.geteuid()}) "
                "cannot make it so: creating it or changing its owner takes root or CAP_CHOWN")
    blocked = blocked_at(home, user)
    return None if blocked is None else _blocked(agent, user, blocked, home)


def account(agent: str, run_as: str, homes: Path) -> Account:
    """Everything needed to start `agent` as `run_as` here; ConfigError (never a run as this user) when
    the user is unknown, this process cannot switch to it, or its folder cannot be made."""
    try:
        user = lookup(run_as)
    except ConfigError as exc:
        raise ConfigError(f"agent {agent!r}, run_as: {exc}") from None
    problem = switch_problem(agent, user)
    if problem is not None:
        raise ConfigError(problem)
    return Account(user, prepare_home(homes, agent, user), None if user.is_self else user.creds)
