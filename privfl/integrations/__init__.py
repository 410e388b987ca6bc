"""privfl inside other FL engines: :mod:`privfl.integrations.flower` (``pip install privfl[flower]``)."""
