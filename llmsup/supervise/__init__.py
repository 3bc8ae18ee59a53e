"""Supervision of one server: a pure state machine and the runner that carries it out."""
