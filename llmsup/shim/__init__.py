"""A server's log writer, a process of its own that outlives the daemon
(`python -m llmsup.shim`; the contract is in `llmsup.shim.main`).

Standard library only, and nothing of llmsup imported beyond this package: it
starts once per launch and must start fast and stay small.
"""
