"""``python -m nlp_transfer.features list|clear``: same as ``...features.cache``."""

from nlp_transfer.features.cache import main

raise SystemExit(main())
