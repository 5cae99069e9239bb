"""The parent side: one run of a group (``run``), starting processes (``launcher``),
shipping the user's function (``shipping``), and rank slots across xdist workers (``slots``).
Imports the rank side only by name (job targets), never its modules."""
