"""The data scientist's side of fedsyft: models, the site-side step, the round loop.

Nothing here imports syft: sites are reached through :class:`fed_tasks.interface.SiteConnection`,
which ``datasites`` implements for real PySyft datasites.
"""
