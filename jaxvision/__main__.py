"""`python -m jaxvision <command>`."""

from jaxvision.cli import main

raise SystemExit(main())
