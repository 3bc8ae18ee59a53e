"""`python -m llmsup.cli`: the `llmsup` command."""

from llmsup.cli import main

main()
