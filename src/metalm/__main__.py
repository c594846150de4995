"""`python -m metalm ...` = `metalm ...`."""

from metalm.cli import main

raise SystemExit(main())
