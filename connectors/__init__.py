"""commsync.connectors."""
