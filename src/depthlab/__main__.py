"""`python -m depthlab` runs the same CLI as the `depthlab` script (useful where scripts are not on PATH)."""
from depthlab.cli import main

if __name__ == "__main__":
    main()
