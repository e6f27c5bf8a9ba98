"""Stage 1, ingest: the PACS's instances in, durable and recorded.

``rules`` judges what arrives (pure functions), ``store`` makes an accepted instance
durable (spool file, fsync, ledger), ``admission`` decides which connections are
served and for how long, ``server`` puts them on the network with the
``stock`` (plain pynetdicom) or the ``fast`` engine, whose overrides of pynetdicom's
internals all live in ``fast``.
"""
