"""`python -m ghnviz ...` runs the command line (see ghnviz.cli)."""

from ghnviz.cli import main

if __name__ == '__main__':
    raise SystemExit(main())
