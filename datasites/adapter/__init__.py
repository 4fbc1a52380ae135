"""The only syft-specific plumbing: servers, logins, the job-code template, the scientist's
client.
"""
