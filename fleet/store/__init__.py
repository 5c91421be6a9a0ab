"""The store: the certificate authority and everything it keeps on disk.

The CA and its rotation, the workspace, the SQLite registry, provisioning, revocation and CRLs,
renewal, replacement, enrollment claims, admin identities, bundles and the JSON views of them.
Imports only :mod:`fleet.kernel`.
"""
