"""`python -m goinfer`: the same commands as the `goinfer` script."""

from goinfer.cli import main

if __name__ == "__main__":
    main()
