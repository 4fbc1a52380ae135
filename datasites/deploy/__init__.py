"""Running a federation for real: one long-lived datasite server per institution.

``federation.toml`` (:mod:`.config`) says where every site lives; ``fedsyft up`` provisions
and starts them (:mod:`.provision`, :mod:`.processes`, :mod:`.serve`); the data scientist,
the owners and the officers reach them over HTTP (:mod:`.remote`).
"""
