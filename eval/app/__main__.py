"""`python -m eval.app`: see eval/app/cli.py."""

from eval.app.cli import main

main()
