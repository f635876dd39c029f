"""`python -m fluid_cli` runs the same Typer app as the `fluid` console script."""

from fluid_cli.cli import main

if __name__ == "__main__":
    main()
