"""The only place that spawns, signals and reaps server processes.

The contract the daemon (and the CLI, for a daemon that is gone) relies on:

- `spawn(...) -> Child`: start one server under a log shim of its own
  (`llmsup.shim`: the output reaches its log whatever becomes of the daemon),
  in a session of its own, with a marker in its environment, a private TMPDIR
  and, where the daemon may make one, a cgroup of its own (`cgroup.prepare`).
  Save `child.record` at once.
- `verify(record)` / `Child.adopt(record, ...)`: a server a daemon before us
  started, still running and provably the same process (pid and start time,
  its cgroup or marker, its shim): supervised again, never restarted.
- `Child.exited()`: the server process's exit status, as soon as it exits
  (a pidfd, and the exit file its shim writes).
- `track(children)`: a snapshot of the servers' trees, every few seconds; the
  records learn every process and shared-memory segment seen (save them).
- `members(record)`: every live process of a launch, found by its cgroup, its
  process group, its marker, the processes its record remembers, and their
  descendants (see `tracking`): none of these is relied on alone.
- `stop(record, grace, leader)`: SIGTERM to the members, `grace`, then
  `cgroup.kill` and SIGKILL; complete only when no member is left; then the
  cgroup, the TMPDIR and the shared memory the tree held are removed.
- `ServerLog(path, max_bytes, backups)`: a server's log file, as its shim
  writes it; a write that fails drops output (counted, in status through the
  shim's status file), never the server's pipe.
- `load_records` / `save_record` / `drop_record`: the state directory's memory
  of each launch, for a daemon that was killed.

`spawn_helper(...)` starts one of the daemon's own helpers (the gateway process)
with the daemon's marker, registered so that orphan reaping leaves it alone;
`exit_status(proc)` awaits a child's exit (pidfd).

The daemon is a child subreaper (`become_subreaper`): orphans of its servers
come back to it; `reap_loop` waits for them, never for a server itself.
"""

from llmsup.process import cgroup, litter
from llmsup.process.child import NOT_RUNNING, Child, exit_code_of, verify
from llmsup.process.ports import port_holder, port_in_use
from llmsup.process.records import (
    Record,
    drop_record,
    load_records,
    save_record,
    state_key,
)
from llmsup.process.spawn import (
    SCRUBBED_ENV,
    LogSpec,
    append_line,
    child_env,
    exit_status,
    find_executable,
    spawn,
    spawn_helper,
)
from llmsup.process.stop import TRACK_INTERVAL, reap_loop, save, stop, strays, terminate, track
from llmsup.process.tracking import (
    MARKER,
    TABLE,
    ProcessTable,
    Seen,
    become_subreaper,
    marked_with,
    members,
    members_in,
    tree_pids,
)
from llmsup.shim.logfile import ServerLog
from llmsup.state import EXIT_UNKNOWN

__all__ = [
    "EXIT_UNKNOWN",
    "MARKER",
    "NOT_RUNNING",
    "SCRUBBED_ENV",
    "TABLE",
    "TRACK_INTERVAL",
    "Child",
    "LogSpec",
    "ProcessTable",
    "Record",
    "Seen",
    "ServerLog",
    "append_line",
    "become_subreaper",
    "cgroup",
    "child_env",
    "drop_record",
    "exit_code_of",
    "exit_status",
    "find_executable",
    "litter",
    "load_records",
    "marked_with",
    "members",
    "members_in",
    "port_holder",
    "port_in_use",
    "reap_loop",
    "save",
    "save_record",
    "spawn",
    "spawn_helper",
    "state_key",
    "stop",
    "strays",
    "terminate",
    "track",
    "tree_pids",
    "verify",
]
