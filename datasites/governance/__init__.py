"""What decides and records at a site: accounts, policy, privacy ledger, guard, review,
audit log, compliance.
"""
