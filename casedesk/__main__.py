"""`python -m casedesk` is the same program as the `casedesk` command."""

from casedesk.cli import main

raise SystemExit(main())
