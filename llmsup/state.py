"""A server's states as status shows them, and what its exit codes say. The life
that moves between the states: `llmsup.supervise.machine`; what a server's log
lines say: its backend (`llmsup.backends`)."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    WAITING = "WAITING"  # for a server it starts after (shared GPU)
    WAITING_GPU = "WAITING_GPU"  # for free memory on its GPUs
    STARTING = "STARTING"  # process spawned, port not answering yet
    LOADING = "LOADING"  # answering, pulling or loading the model
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"  # probes failing, not yet enough to restart
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    FAILED = "FAILED"

    @property
    def running(self) -> bool:
        return self in (State.STARTING, State.LOADING, State.READY, State.UNHEALTHY)


# The exit status of a server whose log shim was gone before it could say it.
EXIT_UNKNOWN = -1000


def describe_exit(returncode: int) -> str:
    if returncode == EXIT_UNKNOWN:
        return "exited (status unknown: its log shim was gone)"
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"
