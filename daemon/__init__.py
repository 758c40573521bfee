"""commsync.daemon."""
