"""serversync: open-source server-side synchronization of mailboxes with application records."""

__version__ = "0.1.0"
