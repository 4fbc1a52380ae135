"""The ``fedsyft`` command line."""
