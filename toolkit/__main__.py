"""`python -m gantk` runs the command line."""
from .cli import main

main()
