"""`python -m pgmux` and the `pgmux` console script."""

from pgmux.proxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
