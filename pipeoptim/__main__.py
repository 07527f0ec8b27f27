"""``python -m pipeoptim`` runs the command line."""

from pipeoptim.cli.entry import main

main()
