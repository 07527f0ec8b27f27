"""``python -m pipeoptim`` runs the command line."""

from pipeoptim.cli.main import main

main()
