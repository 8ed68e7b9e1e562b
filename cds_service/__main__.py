"""`python -m cds_service` runs the command line."""

from .cli import main

raise SystemExit(main())
