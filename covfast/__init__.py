"""covfast: fast, quantified COVID-19 reports from chest CT volumes."""

__version__ = "0.1.0"


def infer(*args, **kwargs):
    """Run the covfast pipeline on a path or an array; see :func:`covfast.api.infer`."""
    from covfast.api import infer as _infer

    return _infer(*args, **kwargs)


__all__ = ["__version__", "infer"]
