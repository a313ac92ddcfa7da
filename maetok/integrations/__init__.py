"""Bridges to other libraries, each an optional extra: :mod:`maetok.integrations.diffusers` (``maetok[diffusers]``).

Nothing here is imported by ``import maetok``; importing a bridge without its library raises one ``ImportError``
line naming the extra to install.
"""
