"""`python -m batchnorm ...` is the `batchnorm` command (see batchnorm.lab.cli)."""
from batchnorm.lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
