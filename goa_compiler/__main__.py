"""`python -m goa_compiler ...` is the `goa` command."""
import sys

from goa_compiler.ui.cli import main

if __name__ == "__main__":
    sys.exit(main())
