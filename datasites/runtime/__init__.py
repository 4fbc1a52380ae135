"""A running site: its directory and store, provisioning, the approved-call entry point and
what protects its replies.
"""
