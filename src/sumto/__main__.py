"""``python -m sumto``: the same command line as the ``sumto`` console script."""

from sumto.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
