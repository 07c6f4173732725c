"""`python -m eval.watch`: see eval/watch/__init__.py."""

from eval.watch.cli import main

if __name__ == "__main__":
    main()
