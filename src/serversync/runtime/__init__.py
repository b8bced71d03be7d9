"""Scheduling, backoff, push (IMAP IDLE), the local runner and the distributed workers."""
