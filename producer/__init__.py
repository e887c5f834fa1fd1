"""refexp producer: seeding, enqueueing, run status and the ``producer`` CLI."""
